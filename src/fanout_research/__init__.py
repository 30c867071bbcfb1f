"""fanout-research: run autoresearch loops as K parallel batch jobs on any backend.

The package import is kept light on purpose (no pydantic, no git): the local job supervisor is a
module of this package and starts once per job.
"""

__version__ = "0.1.0"
