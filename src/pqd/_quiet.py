"""Known-harmless third-party messages that pqd's own calls trigger, silenced in one place.

The Python API's entry points run inside :func:`quiet` (the filters hold during pqd's own
calls and are removed afterwards: ``import pqd`` changes no global logging or warning
state); the ``pqd`` command installs them for good (:func:`quiet_command`). Each filter is
narrow (a message or the warning's module): a user's own warnings, and other warnings of
the same libraries, still show.

- torchao's import logs "Failed to load .../_C_cutlass_90a.abi3.so" (and other optional
  GPU kernels) on a machine without them;
- torch 2.13 logs that torchao registers an Enum as a pytree constant (``register_constant``
  deprecation), on every import of torchao's quantizers;
- torchao's X86InductorQuantizer warns while pqd annotates (skipped configs, unquantized
  max-pool inputs): pqd re-annotates those nodes itself (see :mod:`pqd.quant.annotate`);
- torch's pytree warns ``isinstance(treespec, LeafSpec)`` is deprecated whenever torchao's
  graphs are deep-copied.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

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


def _log_filters() -> list[tuple[logging.Logger, logging.Filter]]:
    """Add the log filters that are not there yet; returns those added."""
    added: list[tuple[logging.Logger, logging.Filter]] = []
    for name, text in _LOGGED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            f = _DropMessage(text)
            logger.addFilter(f)
            added.append((logger, f))
    return added


def _warning_filters() -> None:
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


def quiet_known_noise() -> None:
    """Install the filters for good (idempotent: installing twice adds nothing)."""
    _log_filters()
    _warning_filters()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The filters while the block runs (pqd's own calls); the warning filters and loggers
    are as before afterwards."""
    added = _log_filters()
    try:
        with warnings.catch_warnings():
            _warning_filters()
            yield
    finally:
        for logger, f in added:
            logger.removeFilter(f)


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


P = ParamSpec("P")
R = TypeVar("R")


def quietly(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run inside :func:`quiet` (for the public API's entry points)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with quiet():
            return fn(*args, **kwargs)

    return wrapper
