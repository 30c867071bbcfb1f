"""Test kit for backends: a research repo with a scripted job, and the conformance suite."""
