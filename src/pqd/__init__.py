"""pqd: ordered compression pipelines judged by the deployed artifact."""

from pqd._quiet import quiet_known_noise

__version__ = "0.1.0"

quiet_known_noise()  # torchao/torch messages pqd's calls trigger and users cannot act on
