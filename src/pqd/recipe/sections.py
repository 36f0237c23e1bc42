"""The recipe's sections other than the stages and the search: the model, the data and its
augmentation, training (:class:`TrainSpec`, the per-stage :class:`TrainOverride` and
:func:`merge_train`), the baseline, export and measurement. Kept apart from the stage specs
so each file reads as one kind of setting."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    create_model,
    model_serializer,
    model_validator,
)

from pqd.recipe.base import Fraction, Strict


class ModelSpec(Strict):
    """Which network: a zoo name (``pqd models`` lists them) or ``module:callable``."""

    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class AugmentSpec(Strict):
    """Training augmentation: a random crop, then a horizontal flip. ``crop``: ``pad`` (a
    random crop after ``crop_padding`` pixels of padding, CIFAR style), ``resized`` (a random
    resized crop: area fraction in [``min_scale``, 1], ImageNet style) or ``auto`` (``resized``
    for images of 64 pixels or more, else ``pad``). ``cutout``: the side in pixels of a square
    at a random centre filled with the batch's mean colour after the crop and flip (0: off;
    DeVries & Taylor use 16 on CIFAR-10)."""

    crop: Literal["auto", "pad", "resized"] = "auto"
    crop_padding: int = Field(default=4, ge=0, le=16)
    pad_mode: Literal["reflect", "zeros"] = "reflect"
    min_scale: float = Field(default=0.25, gt=0.0, le=1.0)
    flip: bool = True
    cutout: int = Field(default=0, ge=0, le=1024)


class DataSpec(Strict):
    """Data set and split. ``root`` (in a recipe file: relative to the file; on the command
    line as ``data.root=``: relative to the shell's folder) is overridden by ``--data-dir``
    and overrides ``PQD_DATA_DIR``. ``download``: fetch a missing official data set (true),
    never (false), or (null, the default) only into pqd's default ``./data`` when no folder
    was named. ``folder``: ``root/train/<class>/*`` image files
    (optional ``root/val/``, ``root/test/``; else ``test_size`` then ``val_size`` carved from
    train); ``image_size``: side in pixels the images are resized to (default: 32 for
    CIFAR/SVHN, the file's own for npz, 64 for folders); ``on_bad_image``: ``error`` or
    ``skip`` undecodable files and empty class folders (folders only); ``split_seed``: the
    seed of every carved split (val, a folder's test, ``limit_*`` subsets). It is not the
    run's ``seed``: runs of several seeds that share a baseline must share its split, or
    the later seeds validate (and, for a folder, test) on images the baseline trained on."""

    dataset: Literal["cifar10", "cifar100", "svhn", "npz", "folder"] = "cifar10"
    root: str | None = None
    image_size: int | None = Field(default=None, ge=8, le=4096)
    val_size: Annotated[int, Field(ge=0)] | Annotated[float, Field(gt=0.0, lt=1.0)] = 500
    test_size: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    on_bad_image: Literal["error", "skip"] = "error"
    split_seed: int = Field(default=0, ge=0)
    download: bool | None = None
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    limit_train: int | None = Field(default=None, ge=1)
    limit_test: int | None = Field(default=None, ge=1)
    # where root was named: "recipe" (the file, or a dict) or "override" (data.root= on the
    # command line); for error lines only (pqd.data.DataRoot)
    _root_from: str = PrivateAttr(default="recipe")


class TrainSpec(Strict):
    """The shared fine-tune loop's settings; stages override single fields."""

    batch_size: int = Field(default=128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0.0, lt=1.0)
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    warmup: Fraction = 0.0
    label_smoothing: Fraction = 0.0
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    grad_clip: float | None = Field(default=None, gt=0.0)
    # a gradient norm above this (or not finite) stops the stage as diverged; None: no limit
    max_grad_norm: float | None = Field(default=1000.0, gt=0.0)
    # a stage that leaves a model that was above chance at chance on the validation split
    # (one-sided exact binomial test) stops the run; false keeps such a model
    stop_at_chance: bool = True
    # decay per optimizer step of an exponential moving average of the weights (e.g. 0.999:
    # the average spans about 1,000 steps); the model ends the fit with the average; null: off
    ema: float | None = Field(default=None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainSpec:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov needs momentum > 0; fix: set momentum or nesterov: false")
        return self


class TrainOverride(Strict):
    """Same fields as :class:`TrainSpec`, all optional: only what is set overrides.

    ``grad_clip: null`` / ``max_grad_norm: null`` / ``ema: null`` written here turn that check
    (or the weight average) off for this stage (as they do in ``train``); a field that is not
    written inherits. Only written
    fields are serialized, so a dumped recipe loads back with the same meaning.
    """

    # the fields: TrainSpec's, each optional (None: inherit), made below from TrainSpec

    @model_serializer(mode="wrap")
    def _written_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


def _optional_fields(spec: type[BaseModel]) -> dict[str, Any]:
    """``spec``'s fields as optional ones (default None) with the same constraints."""
    fields = {}
    for name, info in spec.model_fields.items():
        optional = copy.copy(info)
        optional.default = None
        optional.default_factory = None
        fields[name] = (info.annotation | None, optional)
    return fields


# same fields as TrainSpec, all optional
TrainOverride = create_model(  # type: ignore[misc]
    "TrainOverride",
    __base__=TrainOverride,
    __doc__=TrainOverride.__doc__,
    **_optional_fields(TrainSpec),
)


# TrainSpec fields where null is a value (off), not "inherit"
_NULL_MEANS_OFF = ("grad_clip", "max_grad_norm", "ema")


def merge_train(base: TrainSpec, override: TrainOverride) -> TrainSpec:
    """Return ``base`` with every field that ``override`` sets replaced.

    Args:
        base: the recipe's ``train`` section.
        override: a stage's (or the baseline's) ``train`` section.

    Returns:
        The merged settings; an explicit null overrides only ``grad_clip``,
        ``max_grad_norm`` and ``ema`` (off), elsewhere it inherits.
    """
    written = {
        k: v for k, v in override.model_dump().items() if v is not None or k in _NULL_MEANS_OFF
    }
    return TrainSpec(**{**base.model_dump(), **written})


class BaselineSpec(Strict):
    """Train the baseline (``epochs``) or load it (``checkpoint``: .safetensors or a torch
    state_dict file, see :func:`pqd.checkpoint.read_state_dict`)."""

    checkpoint: str | None = None
    epochs: int = Field(default=30, ge=0, le=10_000)
    train: TrainOverride = Field(default_factory=TrainOverride)

    @model_validator(mode="after")
    def _something_to_do(self) -> BaselineSpec:
        if self.checkpoint is None and self.epochs == 0:
            raise ValueError(
                "needs epochs > 0 or a checkpoint; fix: set baseline.epochs or baseline.checkpoint"
            )
        return self


class ExportSpec(Strict):
    """How the deployable artifact is written."""

    opset: int = Field(default=20, ge=17, le=23)
    parity_samples: int | None = Field(default=None, ge=1)  # None: the whole test split
    # the CPUs the INT8 file must be exact on (pqd.target): portable / x86-avx2 train 7-bit
    # weights (no int16 saturation without VNNI); x86-vnni full 8-bit; auto: this machine's
    target: Literal["portable", "x86-avx2", "x86-vnni", "auto"] = "portable"
    # lowest top-1 agreement (fraction) of a file with its torch model before parity fails
    parity_min_agreement: float = Field(default=0.99, ge=0.0, le=1.0)
    compress: bool = False  # also write final.onnx.xz (zeros compress: sparsity pays on disk)


class MeasureSpec(Strict):
    """How artifacts are measured: runtimes, threads, batch sizes, repeats."""

    # "auto": every installed runtime, onnxruntime first (the headline numbers); "openvino-ir":
    # OpenVINO on the IR (.xml/.bin) converted from the ONNX file, kept where it runs faster
    runtimes: list[Literal["auto", "onnxruntime", "openvino", "openvino-ir"]] = Field(
        default_factory=lambda: ["auto"], min_length=1
    )
    threads: int = Field(default=2, ge=1, le=512)
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 64], min_length=1
    )
    warmup: int = Field(default=50, ge=0)
    repeats: int = Field(default=300, ge=5)
    accuracy_batch_size: int = Field(default=256, ge=1)
    exit_latency_rounds: int = Field(default=3, ge=1, le=100)  # passes over the test split
    # the full audit (pqd.measurement.audit): corruption suite, peak memory and CPU-s/energy of a
    # fresh process; per-class damage, disagreement, calibration and p99/max are always on
    audit: bool = False

    @model_validator(mode="after")
    def _batch_one_first(self) -> MeasureSpec:
        if self.batch_sizes[0] != 1:
            raise ValueError("batch_sizes must start with 1; fix: list 1 first, e.g. [1, 64]")
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError("runtimes lists a runtime twice; fix: list each runtime once")
        if "auto" in self.runtimes and len(self.runtimes) > 1:
            raise ValueError(
                "runtimes: 'auto' already means every installed runtime; "
                "fix: give [auto] alone or name the runtimes"
            )
        return self
