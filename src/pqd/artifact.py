"""The deployable file as a Python user handles it: :func:`export` a model (or a stage
state) to one ONNX file, :func:`measure` a file on test images (the entries ``record.json``
holds for a file), and :func:`torch_model`, the torch module a file reproduces.

These are the pieces ``pqd run`` and :func:`pqd.compress` use (:mod:`pqd.onnx_export`,
:mod:`pqd.measurement.artifacts`), opened to notebooks: compress elsewhere, export here;
export here, measure on another machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from pqd._quiet import quiet, quietly
from pqd.errors import DataError, PqdError
from pqd.recipe import MeasureSpec
from pqd.state import State
from pqd.train import is_graph, set_train

if TYPE_CHECKING:
    from pqd.dataset import Dataset


class Deployed(nn.Module):
    """The torch model an exported file reproduces, as an ordinary module.

    A quantized state converts to a ``torch.export`` graph of INT8 ops whose own ``.eval()``
    raises; here ``.eval()``/``.train()`` switch it the way torchao documents
    (``move_exported_model_to_eval``), so ``model.eval(); model(x)`` works on either kind.

    Attributes:
        inner: the float model or the converted INT8 graph (images in [0, 1], as the file).
        quantized: whether ``inner`` runs INT8 arithmetic (quantize/dequantize ops).
        mean, std: where set, inputs come normalised by them (as the model handed to
            :func:`pqd.compress` took them) and are mapped back to [0, 1] first.
    """

    def __init__(
        self,
        inner: nn.Module,
        quantized: bool,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        from pqd.models import Normalize

        self.inner = inner
        self.quantized = quantized
        self.unnormalize = (
            Normalize(mean, std, inverse=True) if mean is not None and std is not None else None
        )
        set_train(self.inner, False)
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unnormalize is not None:
            x = self.unnormalize(x)
        return self.inner(x)

    def train(self, mode: bool = True) -> Deployed:
        with quiet():  # torchao's switch deep-copies graphs (a pytree deprecation warning)
            set_train(self.inner, mode)
        self.training = mode
        return self


def _state(model_or_state: nn.Module | State) -> State:
    if isinstance(model_or_state, State):
        return model_or_state
    if isinstance(model_or_state, Deployed):
        raise PqdError(
            "this is a Deployed model (already converted for export)",
            "pass the state or the model the stages returned (e.g. result.state)",
        )
    if not isinstance(model_or_state, nn.Module):
        raise PqdError(
            f"cannot export a {type(model_or_state).__name__}",
            "pass an nn.Module or the pqd.State that pqd.apply_stages returned",
        )
    from pqd.quant.layers import fake_quantizers

    quantized = is_graph(model_or_state) and any(True for _ in fake_quantizers(model_or_state))
    return State(model=model_or_state, quantized=quantized)


@quietly
def torch_model(
    model_or_state: nn.Module | State,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Deployed:
    """The torch module that :func:`export` writes to a file: INT8-converted when the model
    carries fake-quantizers (a quantize stage ran), else a float copy; in eval mode.

    Args:
        model_or_state: an ``nn.Module`` or a :class:`pqd.State` (``pqd.apply_stages``).
        mean, std: take inputs normalised by these (mapped back to [0, 1] first); default:
            images in [0, 1], as the file takes them.

    Returns:
        :class:`Deployed` (call ``.eval()`` and run it like any module).
    """
    from pqd.models.multi_exit import MultiExitNet
    from pqd.onnx_export import deployable_model

    state = _state(model_or_state)
    inner = (
        state.model  # an early-exit net's exits run as they are
        if isinstance(state.model, MultiExitNet)
        else deployable_model(state.model, state.quantized).cpu()
    )
    return Deployed(inner, state.quantized, mean, std)


@quietly
def export(
    model_or_state: nn.Module | State,
    path: str | Path,
    example: torch.Tensor,
    *,
    opset: int = 20,
) -> Path:
    """Write the deployable ONNX file of a model, as ``pqd run`` writes ``final.onnx``.

    Args:
        model_or_state: an ``nn.Module`` taking float NCHW images in [0, 1], or a
            :class:`pqd.State`; a model with fake-quantizers (after a quantize stage) is
            written as INT8 QDQ with the scales it learned.
        path: the ``.onnx`` file to write (folders are created).
        example: an input batch like the real ones (float, NCHW; any batch size, the file's
            batch dimension is dynamic).
        opset: the ONNX opset.

    Returns:
        The path written.
    """
    from pqd.measurement.saturation import saturation
    from pqd.models.multi_exit import MultiExitNet
    from pqd.onnx_export import export_onnx, set_metadata

    state = _state(model_or_state)
    if isinstance(state.model, MultiExitNet):
        raise PqdError(
            "an early-exit model exports as one file per segment",
            "use pqd.compress (it writes exits/ and final.onnx) for early-exit models",
        )
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        raise DataError(
            "example must be a float image batch [N, C, H, W]",
            "pass e.g. torch.rand(2, 3, 32, 32)",
        )
    example = example.detach().cpu().float()
    if example.shape[0] < 2:  # the converted graph exports against batch >= 2
        example = example.expand(2, *example.shape[1:]).contiguous()
    written, _ = export_onnx(  # (exports a converted copy: the model's mode is untouched)
        state.model.cpu(), Path(path), example, quantized=state.quantized, opset=opset
    )
    if state.quantized:
        set_metadata(
            written, {"pqd.saturating_weight_pairs": str(saturation(written)["pairs_at_risk"])}
        )
    return written


def _test_split(data: Any) -> Dataset:
    """A ``pqd.data.Dataset`` with a test split, from one or a split-like."""
    import dataclasses

    from pqd.data import Dataset, as_dataset

    if isinstance(data, Dataset):
        if len(data.test_y) == 0:
            raise DataError(
                "the data set has no test split to measure on",
                "pass test=(images, labels) to pqd.data.from_tensors",
            )
        return data
    if isinstance(data, dict):  # {"test": split, "mean": ..., "std": ...}
        if "test" not in data:
            raise DataError(
                f"the data dict has {sorted(data)} but no 'test'",
                "give {'test': (images, labels)} (with 'mean'/'std' for normalised images)",
            )
        rest = {k: v for k, v in data.items() if k not in ("train", "val", "test")}
        test = as_dataset({**rest, "train": data["test"], "val_size": 0})  # keys checked
    else:
        test = as_dataset({"train": data, "val_size": 0})
    return dataclasses.replace(
        test,
        test_x=test.train_x,
        test_y=test.train_y,
        train_x=test.train_x[:0],
        train_y=test.train_y[:0],
    )


@quietly
def measure(
    path: str | Path,
    data: Any,
    *,
    reference: nn.Module | State | None = None,
    runtimes: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    threads: int | None = None,
    spec: MeasureSpec | dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure one ONNX file as ``pqd run`` measures ``final.onnx``: accuracy with its 95%
    interval on the test images, size, complexity, saturation, latency per runtime.

    Args:
        path: the ONNX file.
        data: the test images: a ``pqd.data.Dataset`` (its test split); ``(images,
            labels)``, a torch ``Dataset`` or a ``DataLoader`` (uint8 or float in [0, 1]:
            the file normalises inside); or ``{"test": ..., "mean": ..., "std": ...}`` for
            normalised images (:func:`pqd.data.from_tensors`).
        reference: the torch model (or state) the file was exported from: adds ``parity``
            (share of images whose class the file and the model agree on) and
            ``torch_accuracy``; none: those entries are left out.
        runtimes: runtimes to run it on (default the recipe's: ``onnxruntime``), e.g.
            ``["onnxruntime", "openvino"]``; the first gives the headline entries.
        batch_sizes: batch sizes timed (default ``[1]``).
        threads: intra-op threads of the runtimes (default 1).
        spec: more measurement settings (the recipe's ``measure`` section).
        progress: show progress bars.

    Returns:
        The file's entry as in ``record.json`` (``accuracy``, ``accuracy_ci``,
        ``test_images``, ``size_bytes`` in bytes, ``latency_ms`` with p50/p90 in ms,
        ``runtimes``, ``macs``, ``saturation``, ...).
    """
    from pqd.measurement.artifacts import measure_onnx, torch_reference

    file = Path(path)
    if not file.is_file():
        raise PqdError(f"{file} does not exist", "pass the path of an .onnx file")
    base = spec if isinstance(spec, MeasureSpec) else MeasureSpec(**(spec or {}))
    overrides = {
        k: list(v) if isinstance(v, (list, tuple)) else v
        for k, v in (("runtimes", runtimes), ("batch_sizes", batch_sizes), ("threads", threads))
        if v is not None
    }
    from pqd.measurement.runtime import resolve_runtimes

    settings = MeasureSpec(**{**base.model_dump(), **overrides})
    settings = settings.model_copy(update={"runtimes": resolve_runtimes(settings.runtimes)})
    test = _test_split(data)
    references = (
        {"file": torch_reference(torch_model(reference), test, None)}
        if reference is not None
        else {}
    )
    return measure_onnx({"file": file}, references, test, settings, progress=progress)["file"]
