"""ami-janitor: reference-aware AMI retention, staged retirement, Latest rotation and replication."""

__version__ = "0.1.0"
