"""A step's state as a checkpoint file, and back: what a run folder (:mod:`pqd.resume`)
keeps after each step and each epoch.

After a step: the weights (eager or graph), the pruning masks, and what rebuilds the
model's form. A state after a quantize stage is a PT2E QAT graph; it is rebuilt by running
the same ``prepare_qat`` on a fresh eager model and loading the saved graph state_dict
into it (the graph's names are the eager names plus fake-quant/observer buffers); a
channel-pruned net is rebuilt to its saved widths, exit heads to their saved parts.
After an epoch: the model, masks, optimizer, epoch, loader and torch RNG states
(:class:`pqd.train.FitProgress`), so the fit loop continues as if never stopped.
Everything is safetensors + JSON: loading never unpickles anything.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn

from pqd.checkpoint import atomic_write_bytes
from pqd.errors import CheckpointError
from pqd.train import FitProgress


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata={"pqd": json.dumps(meta)}))


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pqd", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({exc})", "run with --fresh to start over"
        ) from None
    return tensors, meta


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_state(path: Path, fingerprint: str, state: Any) -> None:
    """The ``pqd.state.State`` after a step: weights (graph or eager), masks, and what
    rebuilds its form: channel structure, N:M layers, the quantization scheme of a graph."""
    from pqd.models.multi_exit import MultiExitNet
    from pqd.quant.scheme import quant_scheme

    model = state.model
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask.{k}": m for k, m in state.masks.items()})
    exits = None
    if isinstance(model, MultiExitNet):  # what rebuilds the exits around the backbone
        exits = {
            "positions": model.positions,
            "num_classes": model.num_classes,
            "confidence": model.confidence,
            **model.head_config,
            "thresholds": model.thresholds,
            "exit_loss": model.exit_loss,
            "detach_heads": model.detach_heads,
            "part_schemes": _part_schemes(model) if state.quantized else None,
        }
    _save(
        path,
        tensors,
        {
            "fingerprint": fingerprint,
            "quantized": state.quantized,
            "scheme": quant_scheme(model) if state.quantized else None,
            "structure": state.structure,
            "nm_layers": state.nm_layers,
            "exits": exits,
        },
    )


def _part_schemes(net: nn.Module) -> dict[str, Any]:
    """The quantization scheme of each PT2E part of a multi-exit net, by part name."""
    from pqd.quant.scheme import META_KEY

    return {
        name: part.meta.get(META_KEY)
        for name, part in net.parts()  # type: ignore[attr-defined]
        if isinstance(part, torch.fx.GraphModule)
    }


def load_state(
    path: Path, fresh_model: Callable[[], nn.Module], example: Callable[[], torch.Tensor]
) -> Any:
    """Rebuild the state :func:`save_state` wrote: a fresh model (``fresh_model()``) pruned to
    the saved channel structure, made a QAT graph by the same ``prepare_qat`` (and float
    layers) when it was one, then the saved tensors loaded.

    Args:
        path: the step checkpoint.
        fresh_model: builds a fresh unpruned eager model like the run's.
        example: draws an example input batch (for channel surgery and ``prepare_qat``).

    Returns:
        The ``pqd.stages.State``.
    """
    from pqd.prune.channels import rebuild_model
    from pqd.state import State

    tensors, meta = _load(path)
    structure = meta.get("structure") or []
    ex = example().cpu() if structure else None  # (drawn before the fresh weights)
    model = rebuild_model(fresh_model(), structure, ex)
    quantized = bool(meta.get("quantized"))
    saved = _split(tensors, "model.")
    if meta.get("exits"):
        model = _rebuild_exits(model, meta, saved, example)
    elif quantized:
        from pqd.quant.layers import keep_float
        from pqd.quant.prepare import prepare_qat

        scheme = dict(meta["scheme"])
        float_layers = list(scheme.get("float_layers") or [])
        model = prepare_qat(model, example().cpu(), {**scheme, "float_layers": []})
        if float_layers:
            keep_float(model, float_layers)
    _load_strict(model, saved, path)
    masks = {k: m.to(torch.bool) for k, m in _split(tensors, "mask.").items()}
    return State(
        model=model,
        masks=masks,
        quantized=quantized,
        structure=list(structure),
        nm_layers=dict(meta.get("nm_layers") or {}),
    )


def _rebuild_exits(
    eager: nn.Module,
    meta: dict[str, Any],
    saved: dict[str, torch.Tensor],
    example: Callable[[], torch.Tensor],
) -> nn.Module:
    """The multi-exit net an ``early_exit`` step left: the same exits cut from ``eager``,
    each part made the same PT2E graph (float layers kept float) when it was one, and the
    exits' settings (thresholds, how later stages train them) restored."""
    import math

    from pqd.models.multi_exit import build_multi_exit

    exits = meta["exits"]
    x = example().cpu()
    net = build_multi_exit(
        eager,
        exits["positions"],
        exits["num_classes"],
        x,
        head_channels=exits["head_channels"],
        head_kernel=exits["head_kernel"],
        head_stride=exits["head_stride"],
        confidence=exits["confidence"],
    )
    schemes = exits.get("part_schemes")
    if schemes:
        from pqd.models.multi_exit import part_inputs
        from pqd.quant.layers import keep_float
        from pqd.quant.prepare import prepare_qat, tie_boundary_quantizers
        from pqd.quant.scheme import META_KEY

        inputs = part_inputs(net, x)
        for name, part in list(net.parts()):
            net.set_part(
                name, prepare_qat(part, inputs[name], {**schemes[name], "float_layers": []})
            )
        tie_boundary_quantizers(net)
        floats = sorted({n for s in schemes.values() for n in s.get("float_layers") or []})
        if floats and set(net.state_dict()) != set(saved):  # their quantizers were removed
            keep_float(net, floats)
        for name, part in net.parts():  # each a PT2E graph now
            cast(torch.fx.GraphModule, part).meta[META_KEY] = schemes[name]
    net.thresholds = [math.inf if t is None else float(t) for t in exits["thresholds"]]
    net.exit_loss = dict(exits["exit_loss"])
    net.detach_heads = bool(exits["detach_heads"])
    return net


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    mismatch = CheckpointError(
        f"checkpoint {str(path)!r} does not match the recipe's model",
        "run with --fresh to start over",
    )
    if set(own) != set(state):
        raise mismatch
    # Module versions travel in state_dict()._metadata, which a tensor file drops; without
    # them torchao's observers take the dict for a version-1 one and reset ``eps`` to
    # float32 eps (2^-23 instead of the QAT config's 2^-12), changing every later scale.
    with_versions = OrderedDict(state)
    with_versions._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:  # (shapes may differ: an unused per-channel observer's min/max are empty)
        model.load_state_dict(with_versions)
    except RuntimeError:
        raise mismatch from None


def save_epoch(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    progress: FitProgress,
    hook_state: dict[str, Any] | None,
) -> None:
    """Mid-step checkpoint after an epoch (see :class:`pqd.train.FitProgress`)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask.{k}": m for k, m in masks.items()})
    tensors["rng.torch"] = progress.rng
    if progress.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in progress.ema.items()})
    opt_meta = {"param_groups": progress.optimizer["param_groups"], "state": {}}
    for idx, entry in progress.optimizer["state"].items():
        plain = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                plain[key] = value
        opt_meta["state"][str(idx)] = plain
    loader_meta = None
    if progress.loader is not None:
        tensors["rng.loader"] = progress.loader["generator"]
        loader_meta = {k: v for k, v in progress.loader.items() if k != "generator"}
    _save(
        path,
        tensors,
        {
            "fingerprint": fingerprint,
            "epoch": progress.epoch,
            "step": progress.step,
            "seconds": round(progress.seconds, 3),
            "losses": progress.losses,
            "optimizer": opt_meta,
            "loader": loader_meta,
            "hook_state": hook_state,
        },
    )


def load_epoch(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    hook_state: dict[str, Any] | None,
) -> FitProgress | None:
    """Restore what :func:`save_epoch` wrote into ``model``/``masks``/``hook_state``; None
    (and nothing restored) when another recipe wrote it."""
    tensors, meta = _load(path)
    if meta.get("fingerprint") != fingerprint:
        return None
    _load_strict(model, _split(tensors, "model."), path)
    masks.clear()
    params = dict(model.named_parameters())
    masks.update(
        {k: m.to(torch.bool).to(params[k].device) for k, m in _split(tensors, "mask.").items()}
    )
    if hook_state is not None and meta.get("hook_state"):
        hook_state.update(meta["hook_state"])
    opt = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in opt["state"].items()}
    for key, value in _split(tensors, "opt.").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    loader = None
    if meta.get("loader") is not None:
        loader = {**meta["loader"], "generator": tensors["rng.loader"]}
    return FitProgress(
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        optimizer={"state": state, "param_groups": opt["param_groups"]},
        loader=loader,
        rng=tensors["rng.torch"],
        losses=list(meta["losses"]),
        ema=_split(tensors, "ema.") or None,
        seconds=float(meta.get("seconds", 0.0)),
    )
