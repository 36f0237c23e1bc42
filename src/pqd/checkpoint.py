"""Model checkpoints: safetensors on write; safetensors or weights-only torch files on read.

Nothing here unpickles arbitrary objects: ``.safetensors`` holds only tensors,
and ``.pt``/``.pth`` files go through ``torch.load(weights_only=True)``, which
refuses pickles that would build anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import re
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


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts commonly nest the state_dict (Lightning, the PyTorch
tutorials, timm)."""

_MODULE_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that wrappers add to every key: DistributedDataParallel/DataParallel and
``torch.compile``."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _is_safetensors(path: Path) -> bool:
    """True for ``.safetensors`` files, and for files of any suffix that start like one
    (8-byte little-endian header length, then a JSON object)."""
    if path.suffix == ".safetensors":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read without running any code it may carry.

    Accepted: safetensors files, and torch files (``.pt``/``.pth``/``.bin``, read with
    ``weights_only=True``) holding a state_dict or a dict that nests it under
    ``state_dict``, ``model_state_dict`` or ``model`` (other entries such as ``epoch`` or
    optimizer state are ignored). A pickled whole model is refused, never unpickled.

    Args:
        path: the checkpoint file.

    Returns:
        Parameter/buffer name -> tensor, with the file's own key names.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist",
            "give the path of a .safetensors, .pt, .pth or .bin file",
        )
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a valid safetensors file ({exc})",
                "re-save it with pqd or safetensors",
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code payloads, others for corrupt files
        raise _refusal(path, exc) from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        found = (
            f"a dict with keys {', '.join(map(str, list(obj)[:5]))}"
            if isinstance(obj, dict) and obj
            else f"a {type(obj).__name__}"
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds no state_dict of tensors (it holds {found})",
            "save model.state_dict() itself, or nest it under 'state_dict' (safetensors preferred)",
        )
    return obj


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    """Our one line for a torch file that ``weights_only`` loading refused or could not read
    (torch's own message spans lines and carries terminal escape codes)."""
    text = _ANSI.sub("", str(exc))
    found = _GLOBAL.search(text)
    if found:
        name = found.group(1)
        return CheckpointError(
            f"refusing checkpoint {str(path)!r}: it pickles Python objects ({name}; "
            "torch.save(model) of a whole model does this), not only tensors, and unpickling "
            "them could run arbitrary code",
            "if you trust it, load it in Python and re-save its weights: "
            "torch.save(model.state_dict(), 'model.pt') or "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')",
        )
    first = " ".join(text.split())[:160]
    return CheckpointError(
        f"refusing checkpoint {str(path)!r}: it is corrupt or not a torch/safetensors file "
        f"({type(exc).__name__}: {first})",
        "give a file written by torch.save(model.state_dict(), ...) or safetensors",
    )


def _own_candidates(state: dict[str, torch.Tensor], own: set[str]) -> list[dict[str, torch.Tensor]]:
    """Ways to name ``state``'s keys as the model does, most likely first: wrapper prefixes
    (DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``) removed, then a bare network's
    keys put under the Classifier's ``net.``; a prefix every key shares (Lightning's
    ``model.``) removed as a last resort."""
    stripped = dict(state)
    while True:
        prefix = next((p for p in _MODULE_PREFIXES if all(k.startswith(p) for k in stripped)), None)
        if prefix is None:
            break
        stripped = {k[len(prefix) :]: v for k, v in stripped.items()}
    bases = [stripped]
    keys = list(stripped)
    first = keys[0].split(".", 1)[0] + "." if keys and "." in keys[0] else None
    if first and all(k.startswith(first) for k in keys):
        bases.append({k[len(first) :]: v for k, v in stripped.items()})
    wraps = any(k.startswith("net.") for k in own)
    out = []
    for base in bases:
        if not wraps:
            out.append(base)
            continue
        prefixed = {f"net.{k}": v for k, v in base.items()}
        bare = not any(k.startswith(("net.", "norm.")) for k in base)
        out.extend([prefixed, base] if bare else [base, prefixed])
    return out


def _own_layout(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with keys of another layout renamed by the submodules that know it
    (``own_key_of``: the ImageNet ResNets take torchvision's ``layer1.0.conv1.weight``);
    other keys unchanged."""
    renamers = [
        (f"{name}." if name else "", fn)
        for name, m in model.named_modules()
        if callable(fn := getattr(m, "own_key_of", None))
    ]
    if not renamers:
        return state
    out = {}
    for key, value in state.items():
        for prefix, fn in renamers:
            own = fn(key[len(prefix) :]) if key.startswith(prefix) else None
            if own is not None:
                key = prefix + own
                break
        out[key] = value
    return out


def _shape(t: torch.Tensor | torch.Size) -> str:
    shape = t.shape if isinstance(t, torch.Tensor) else t
    return "x".join(str(d) for d in shape) or "scalar"


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` (strict); mismatches raise one-line CheckpointError.

    Besides pqd's own files (keys ``net.*``, ``norm.*``), a plain state_dict of the network
    (``torch.save(net.state_dict(), ...)``) loads, also with DDP's ``module.`` prefix and in
    the wrappers :func:`read_state_dict` accepts, and in torchvision's key layout for the
    ImageNet-style zoo nets (``layer1.0.conv1.weight``, ``fc.weight``). The normalisation
    buffers come from the data set unless the checkpoint holds them.

    Args:
        model: the pqd Classifier (or any module) to fill.
        path: the checkpoint file.

    Returns:
        ``model``, with the checkpoint's weights.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    candidates = [_own_layout(c, model) for c in _own_candidates(state, set(own))]
    state = max(candidates, key=lambda c: len(set(c) & set(own)))  # first of the best
    for k in own:  # normalisation buffers come from the data set, not the checkpoint
        if k.startswith("norm.") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(
                f"{len(wrong)} with another shape (first: {wrong[0]} is "
                f"{_shape(state[wrong[0]])} in the checkpoint, "
                f"{_shape(own[wrong[0]])} in the model)"
            )
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model (first: {unexpected[0]})")
        fix = (
            "build the model the checkpoint was trained as: the same model.name and "
            "model.kwargs, and a data set with as many classes"
            if wrong and not (missing or unexpected)
            else "set model.name/model.kwargs to the architecture the checkpoint was saved from "
            "(pqd reads a plain state_dict, its 'state_dict'/'model' wrappers and DDP's "
            "'module.' prefix)"
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model: " + "; ".join(parts), fix
        )
    model.load_state_dict(state)
    return model
