"""Model checkpoints: safetensors on write; safetensors or weights-only torch files on read.

Nothing here unpickles arbitrary objects: ``.safetensors`` holds only tensors,
and ``.pt``/``.pth`` files go through ``torch.load(weights_only=True)``, which
refuses pickles that would build anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pqd.errors import CheckpointError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # disk full names the file it was writing
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model``'s state_dict as safetensors (+ string metadata) atomically."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"pqd": json.dumps(meta or {})}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist",
                              "give the path of a .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file "
                                  f"({exc})", "re-save it with pqd or safetensors") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code payloads, others for corrupt files
        text = " ".join(str(exc).split())[:160]
        raise CheckpointError(
            f"refusing checkpoint {str(path)!r}: it is corrupt or carries a pickle payload "
            f"that is not plain tensors ({type(exc).__name__}: {text})",
            "load it only if you trust it, and re-save its state_dict as .safetensors",
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state_dict of tensors",
                              "save model.state_dict() (safetensors preferred)")
    return obj


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` (strict); mismatches raise CheckpointError."""
    state = read_state_dict(path)
    own = model.state_dict()
    if not set(state) & set(own) and all(k.startswith("net.") for k in own):
        state = {f"net.{k}": v for k, v in state.items()}  # a bare net's state_dict
    for k in own:  # normalisation buffers come from the data set, not the checkpoint
        if k.startswith("norm.") and k not in state:
            state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
        raise CheckpointError(f"checkpoint {str(path)!r} does not match the model: "
                              + ", ".join(parts),
                              "use the recipe's model name/kwargs the checkpoint was trained with")
    model.load_state_dict(state)
    return model
