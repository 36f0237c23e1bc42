"""Data sets (CIFAR-10/100, SVHN, your own ``.npz``, image folders) and a tensor-resident
batch loader.

Images are kept as uint8 ``[N, 3, H, W]`` tensors (for image folders: views of a
memory-mapped cache, see :mod:`pqd.folder`); :class:`Loader` converts each batch to
float32 in [0, 1] and augments it on the fly on the target device. Normalisation is *not*
done here: the model does it inside its graph, with :attr:`Dataset.mean` / :attr:`Dataset.std`.

Every user-facing problem (missing/corrupt/unsafe files, impossible split sizes) raises
:class:`pqd.errors.DataError` with one line naming the problem and the fix. CIFAR pickles are
read only with a restricted unpickler that builds dicts, lists, bytes, ints and numpy arrays.

The package: :mod:`~pqd.data.sources` (the official data sets), :mod:`~pqd.data.roots`
(where the data folder comes from), :mod:`~pqd.data.files` (files present?),
:mod:`~pqd.data.download`, :mod:`~pqd.data.readers` (:func:`load_dataset`),
:mod:`~pqd.data.tensors` (data in memory) and :mod:`~pqd.data.loader`; the data set itself
is :class:`pqd.dataset.Dataset` and image folders are :mod:`pqd.folder`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pqd.data.loader import Loader
from pqd.data.readers import check_data, load_dataset
from pqd.data.roots import DataRoot, data_root, resolve_data_root
from pqd.data.sources import DATASETS, NUM_CLASSES
from pqd.data.tensors import as_dataset, from_tensors
from pqd.dataset import Dataset  # re-exported: pqd.data is the data API

if TYPE_CHECKING:
    from pqd.folder import from_folder

__all__ = [
    "DATASETS",
    "NUM_CLASSES",
    "DataRoot",
    "Dataset",
    "Loader",
    "as_dataset",
    "check_data",
    "data_root",
    "from_folder",
    "from_tensors",
    "load_dataset",
    "resolve_data_root",
]


def __getattr__(name: str) -> Any:
    """``from_folder`` lives in :mod:`pqd.folder` (which builds on this package): imported
    on first use, so either can be imported first."""
    if name == "from_folder":
        from pqd.folder import from_folder

        return from_folder
    raise AttributeError(f"module 'pqd.data' has no attribute {name!r}")
