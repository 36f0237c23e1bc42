"""Known-harmless third-party messages that pqd's own calls trigger, silenced in one place.

Installed by ``import pqd`` (so library users see none of them) and by the ``pqd`` command.
Each filter is narrow (a message or the warning's module): a user's own warnings, and
other warnings of the same libraries, still show.

- torchao's import logs "Failed to load .../_C_cutlass_90a.abi3.so" (and other optional
  GPU kernels) on a machine without them;
- torch 2.13 logs that torchao registers an Enum as a pytree constant (``register_constant``
  deprecation), on every import of torchao's quantizers;
- torchao's X86InductorQuantizer warns while pqd annotates (skipped configs, unquantized
  max-pool inputs): pqd re-annotates those nodes itself (see :mod:`pqd.quant.pt2e`);
- torch's pytree warns ``isinstance(treespec, LeafSpec)`` is deprecated whenever torchao's
  graphs are deep-copied.
"""

from __future__ import annotations

import logging
import os
import warnings

_LOGGED = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
)


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Install the filters (idempotent: installing twice adds nothing)."""
    for name, text in _LOGGED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
    warnings.filterwarnings(
        "ignore",
        category=FutureWarning,
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    )
    warnings.filterwarnings(
        "ignore",
        category=UserWarning,
        module=r"torchao\.quantization\.pt2e\.quantizer\.x86_inductor_quantizer",
    )


def quiet_command() -> None:
    """Keep third-party chatter off the terminal: the known-harmless messages that
    ``import pqd`` silences (:mod:`pqd._quiet`), and in the command every other
    third-party warning too."""
    quiet_known_noise()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)  # torch's import resets this level
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
