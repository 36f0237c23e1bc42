"""pqd: ordered compression pipelines judged by the deployed artifact."""

__version__ = "0.1.0"
