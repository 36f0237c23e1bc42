"""Where pqd keeps what it can compute again: one root for every cache.

``$PQD_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqd``, else ``~/.cache/pqd``; each kind of cache
has a folder of its own under it (decoded images, corrupted test sets, PT2E patterns).
Deleting the root loses time, never results.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PQD_CACHE_DIR"


def cache_root() -> Path:
    """The cache root: ``$PQD_CACHE_DIR``, else ``$XDG_CACHE_HOME/pqd``, else ``~/.cache/pqd``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pqd"


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cache under :func:`cache_root` (not created here).

    Args:
        kind: the folder's name, e.g. ``"corruptions"``.

    Returns:
        ``cache_root() / kind``.
    """
    return cache_root() / kind
