"""Where the data folder comes from: ``--data-dir``, ``data.root=`` on the command line,
the recipe's ``data.root``, ``PQD_DATA_DIR``, then ``./data`` (:func:`data_root`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pqd.errors import DataError, DataRootError

ENV_DATA_DIR = "PQD_DATA_DIR"
"""Environment variable naming the data folder (below ``--data-dir`` and the recipe's
``data.root``: it is the fallback for recipes that name none)."""


ROOT_SOURCES = ("flag", "override", "recipe", "env", "default")
"""Where a data folder can come from, first wins: ``--data-dir``, ``data.root=`` on the
command line, the recipe's ``data.root``, ``$PQD_DATA_DIR``, pqd's default ``./data``."""


_SOURCE_TEXT = {
    "flag": "the one given with --data-dir",
    "override": "the one given as data.root= on the command line",
    "recipe": "the recipe's data.root",
    "env": f"the one in {ENV_DATA_DIR}, used as neither --data-dir nor data.root names one",
    "default": "pqd's default ./data, as none was named",
}


@dataclass(frozen=True)
class DataRoot:
    """The data folder and where it was named (one of :data:`ROOT_SOURCES`)."""

    path: Path
    source: str

    def where(self) -> str:
        """Where the folder was named, in words (for error lines)."""
        return _SOURCE_TEXT[self.source]

    def download(self, asked: bool | None) -> bool:
        """Whether missing official files may be downloaded: ``data.download`` (or
        ``--download``) when set; else (None) only into pqd's default ``./data``, never
        into a folder the user named."""
        return asked if asked is not None else self.source == "default"

    def fix(self, holding: str) -> str:
        """The fix for a folder that does not hold the data: change the place it was named
        (not what the user just did again)."""
        return {
            "flag": f"check the path after --data-dir: it must be {holding} (--data-dir "
            "wins over data.root and PQD_DATA_DIR)",
            "override": f"check the path after data.root= on the command line (relative to "
            f"the current folder): it must be {holding}",
            "recipe": f"set data.root in the recipe to {holding} (a relative path starts at "
            "the recipe's folder), or name one with --data-dir DIR",
            "env": f"point {ENV_DATA_DIR} at {holding}, or name the folder with data.root in "
            "the recipe or --data-dir DIR (both win over the variable)",
            "default": f"name {holding} with --data-dir DIR, data.root in the recipe, or "
            f"{ENV_DATA_DIR}",
        }[self.source]

    def explain(self, exc: DataRootError) -> DataError:
        """``exc`` with where the folder was named and the fix that fits that place."""
        fix = self.fix(exc.holding) + (f"; or {exc.hint}" if exc.hint else "")
        return DataError(f"{exc.problem} (the data folder is {self.where()})", fix)


def data_root(
    cli_dir: str | Path | None, recipe_root: str | Path | None, root_from: str = "recipe"
) -> DataRoot:
    """The data folder and where it was named, first given wins: ``--data-dir``
    (``cli_dir``), the recipe's ``data.root`` (``recipe_root``: from the command line's
    ``data.root=`` when ``root_from`` is ``"override"``), ``$PQD_DATA_DIR``, else ``./data``;
    ``~`` expanded, made absolute (it need not exist). The same for every kind of data set.
    """
    candidates = (
        (cli_dir, "flag"),
        (recipe_root, root_from),
        (os.environ.get(ENV_DATA_DIR), "env"),
    )
    for candidate, source in candidates:
        if candidate is not None and str(candidate).strip():
            chosen, where = str(candidate).strip(), source
            break
    else:
        chosen, where = "data", "default"
    return DataRoot(Path(os.path.abspath(Path(chosen).expanduser())), where)


def resolve_data_root(cli_dir: str | Path | None, recipe_root: str | Path | None) -> Path:
    """The data folder: ``--data-dir``, else recipe ``data.root``, else ``$PQD_DATA_DIR``,
    else ``./data`` (:func:`data_root` without where it came from)."""
    return data_root(cli_dir, recipe_root).path
