"""The research loop: propose K candidates, validate them, run them as jobs, keep the best."""
