"""Recipe: the whole job as plain, validated data (no torch import here).

A recipe names a model, a data set, how to get the baseline, an ordered list of
compression stages (any order, any subset, repeats allowed), how to export and
how to measure. Unknown keys, wrong types and impossible values are rejected
with one line naming the key path and the fix (:class:`pqd.errors.RecipeError`).

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["stages.0.sparsity=0.7"])
    text = dump_recipe(recipe)          # load(dump(r)) == r
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    model_serializer,
    model_validator,
)
from pydantic._internal._model_construction import ModelMetaclass

from pqd.errors import RecipeError, SpecError, did_you_mean

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class _OneLineErrors(ModelMetaclass):
    """A section built by calling its class in Python (``pqd.Prune(sparsity=0.5)``) fails
    with a one-line :class:`pqd.errors.SpecError` (a ``ValueError``) naming the closest key;
    validation of recipe data (which does not call the class) keeps pydantic's errors for
    :func:`recipe_from_dict` to word with their key paths."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _spec_error(exc, cls) from None


class Strict(BaseModel, metaclass=_OneLineErrors):
    """Base for every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _spec_error(exc: ValidationError, model: type[BaseModel]) -> SpecError:
    """One line for the first problem of a section built in Python, with the closest key."""
    err = exc.errors(include_url=False)[0]
    name = getattr(model, "__name__", "section").removesuffix("Spec")
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        keys = list(model.model_fields) if len(err["loc"]) == 1 else []
        return SpecError(
            f"{name}: unknown key {key!r}{did_you_mean(key, keys)}",
            f"use one of {', '.join(keys)}" if keys else "remove it",
        )
    if err["type"] == "value_error":  # our validators word problem and fix themselves
        msg, _, fix = str(err["ctx"]["error"]).partition("; fix: ")
        return SpecError(f"{name}: {msg}", fix or "see docs/recipe-reference.md")
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SpecError(
        f"{name}: {loc}: {err['msg']} (got {shown})",
        f"give {loc} a valid value (docs/recipe-reference.md)",
    )


class ModelSpec(Strict):
    """Which network: a zoo name (``pqd models`` lists them) or ``module:callable``."""

    name: str = Field(min_length=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class AugmentSpec(Strict):
    """Training augmentation: a random crop, then a horizontal flip. ``crop``: ``pad`` (a
    random crop after ``crop_padding`` pixels of padding, CIFAR style), ``resized`` (a random
    resized crop: area fraction in [``min_scale``, 1], ImageNet style) or ``auto`` (``resized``
    for images of 64 pixels or more, else ``pad``)."""

    crop: Literal["auto", "pad", "resized"] = "auto"
    crop_padding: int = Field(default=4, ge=0, le=16)
    pad_mode: Literal["reflect", "zeros"] = "reflect"
    min_scale: float = Field(default=0.25, gt=0.0, le=1.0)
    flip: bool = True


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

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainSpec:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov needs momentum > 0; fix: set momentum or nesterov: false")
        return self


class TrainOverride(Strict):
    """Same fields as :class:`TrainSpec`, all optional: only what is set overrides.

    ``grad_clip: null`` / ``max_grad_norm: null`` written here turn that check off for this
    stage (as they do in ``train``); a field that is not written inherits. Only written
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
_NULL_MEANS_OFF = ("grad_clip", "max_grad_norm")


def merge_train(base: TrainSpec, override: TrainOverride) -> TrainSpec:
    """Return ``base`` with every field that ``override`` sets replaced.

    Args:
        base: the recipe's ``train`` section.
        override: a stage's (or the baseline's) ``train`` section.

    Returns:
        The merged settings; an explicit null overrides only ``grad_clip`` and
        ``max_grad_norm`` (off), elsewhere it inherits.
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


class StageBase(Strict):
    """Fields every stage has: its fine-tuning epochs and training overrides."""

    epochs: int = Field(default=2, ge=0, le=10_000)
    train: TrainOverride = Field(default_factory=TrainOverride)


Criterion = Literal["magnitude", "taylor", "fisher", "snip", "grasp", "movement"]


class PruneSpec(StageBase):
    """Mask pruning: unstructured to ``sparsity``, or N:M (``n`` kept of every ``m``).

    ``criterion`` scores weights (see :mod:`pqd.prune.importance`; gradients from cross-entropy
    or, with ``criterion_loss: kd``, the KD loss against the teacher, on
    ``score_batches`` training batches). Schedules: ``oneshot``, ``gradual`` (cubic),
    ``iterative`` (``cycles`` prune/retrain rounds). ``rewind`` (lottery tickets):
    train first, prune, reset the surviving weights to the stage start or to the weights
    after ``rewind_epoch`` epochs of that first pass, retrain. ``at_init``: re-initialise
    the weights, score and prune at initialisation (SNIP/GraSP), then train.
    """

    stage: Literal["prune"] = "prune"
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    structure: Literal["unstructured", "nm"] = "unstructured"
    n: int = Field(default=2, ge=1, le=64)  # N:M: weights kept in every group of m
    m: int = Field(default=4, ge=2, le=64)
    scope: Literal["global", "layer"] = "global"
    criterion: Criterion = "magnitude"
    criterion_loss: Literal["ce", "kd"] = "ce"
    score_batches: int = Field(default=8, ge=1, le=10_000)
    at_init: bool = False
    schedule: Literal["oneshot", "gradual", "iterative"] = "oneshot"
    cycles: int = Field(default=3, ge=1, le=100)
    rewind: Literal["none", "stage_start", "epoch"] = "none"
    rewind_epoch: int = Field(default=1, ge=1, le=10_000)
    exclude: list[str] = Field(default_factory=list)  # fnmatch patterns on parameter names

    @model_validator(mode="after")
    def _coherent(self) -> PruneSpec:
        if self.structure == "unstructured" and self.sparsity is None:
            raise ValueError(
                "unstructured pruning needs a sparsity; fix: add e.g. "
                "sparsity: 0.5, or use structure: nm"
            )
        if self.structure == "nm":
            if self.n >= self.m:
                raise ValueError(f"N:M needs n < m (got {self.n}:{self.m}); fix: e.g. n: 2, m: 4")
            implied = 1.0 - self.n / self.m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"{self.n}:{self.m} sparsity is {implied:g}, not "
                    f"{self.sparsity:g}; fix: drop sparsity for structure: nm"
                )
        if self.schedule == "gradual" and self.epochs == 0:
            raise ValueError(
                "schedule 'gradual' needs epochs > 0; fix: set epochs or use schedule: oneshot"
            )
        if self.schedule == "iterative" and self.epochs < self.cycles:
            raise ValueError(
                f"schedule 'iterative' retrains epochs/cycles per cycle (epochs "
                f"{self.epochs} < cycles {self.cycles}); fix: set epochs >= cycles"
            )
        if self.rewind != "none":
            if self.schedule == "gradual" or self.at_init:
                raise ValueError(
                    "rewind works with schedule oneshot or iterative, without "
                    "at_init; fix: drop rewind or change the schedule"
                )
            first = self.epochs if self.schedule == "oneshot" else self.epochs // self.cycles
            if first == 0:
                raise ValueError("rewind needs a training pass before pruning; fix: set epochs > 0")
            if self.rewind == "epoch" and self.rewind_epoch > first:
                raise ValueError(
                    f"rewind_epoch {self.rewind_epoch} is past the first training "
                    f"pass ({first} epoch{'' if first == 1 else 's'}); "
                    f"fix: use rewind_epoch <= {first}"
                )
        if self.at_init and self.schedule != "oneshot":
            raise ValueError("at_init prunes once at initialisation; fix: use schedule: oneshot")
        return self

    @property
    def target_sparsity(self) -> float:
        """The final fraction of pruned weights (``1 - n/m`` for N:M)."""
        if self.structure == "nm":
            return 1.0 - self.n / self.m
        assert self.sparsity is not None
        return self.sparsity


class ChannelTarget(Strict):
    """A budget instead of a ratio: a MACs fraction of the baseline, or a measured latency."""

    macs: float | None = Field(default=None, gt=0.0, lt=1.0)  # fraction of baseline MACs
    latency_ms: float | None = Field(default=None, gt=0.0)  # ONNX, onnxruntime, batch 1, p50
    precision: Literal["auto", "fp32", "int8"] = "auto"  # auto: int8 if quantized now or later
    trials: int = Field(default=7, ge=2, le=50)  # bisection steps (each latency one export)

    @model_validator(mode="after")
    def _exactly_one(self) -> ChannelTarget:
        if (self.macs is None) == (self.latency_ms is None):
            raise ValueError(
                "give exactly one of macs or latency_ms; fix: e.g. target: {macs: 0.5}"
            )
        return self


class PruneChannelsSpec(StageBase):
    """Structured channel pruning with surgery (Torch-Pruning): a smaller dense network.

    ``ratio`` is the fraction of channels removed (per group with ``scope: layer``, over
    all groups with ``scope: global``); or ``target`` gives a MACs or latency budget; or
    ``ratios`` gives one fraction per channel group, keyed by the group's root module name
    (groups not named keep every channel; ``pqd plan`` writes these).
    """

    stage: Literal["prune_channels"] = "prune_channels"
    ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    target: ChannelTarget | None = None
    ratios: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] | None = None
    scope: Literal["layer", "global"] = "layer"
    max_ratio: float = Field(default=0.9, gt=0.0, lt=1.0)  # no group loses more than this
    round_to: int | None = Field(default=8, ge=1, le=512)  # kept channels multiple of this
    criterion: Criterion = "magnitude"
    p: Literal[1, 2] = 2  # magnitude: group L1 or L2 norm
    criterion_loss: Literal["ce", "kd"] = "ce"
    score_batches: int = Field(default=8, ge=1, le=10_000)
    schedule: Literal["oneshot", "iterative"] = "oneshot"
    cycles: int = Field(default=3, ge=1, le=100)
    calibration_batches: int = Field(default=8, ge=1, le=10_000)  # re-prepared QAT graphs
    exclude: list[str] = Field(default_factory=list)  # fnmatch on module names: keep outputs

    @model_validator(mode="after")
    def _ratio_or_target(self) -> PruneChannelsSpec:
        given = [self.ratio is not None, self.target is not None, self.ratios is not None]
        if sum(given) != 1:
            raise ValueError(
                "give exactly one of ratio, target or ratios; fix: e.g. ratio: 0.5, "
                "target: {macs: 0.5} or ratios: {features.0.0: 0.25}"
            )
        if self.ratio is not None and self.ratio > self.max_ratio:
            raise ValueError(
                f"ratio {self.ratio} exceeds max_ratio {self.max_ratio}; fix: "
                "lower ratio or raise max_ratio"
            )
        if self.ratios is not None:
            over = {g: r for g, r in self.ratios.items() if r > self.max_ratio}
            if over:
                group, r = next(iter(over.items()))
                raise ValueError(
                    f"ratios: group {group!r} has {r}, above max_ratio {self.max_ratio}; "
                    "fix: lower it or raise max_ratio"
                )
            if self.scope != "layer":
                raise ValueError(
                    "ratios sets each group's fraction itself; fix: use scope: layer with ratios"
                )
        if self.schedule == "iterative" and self.epochs < self.cycles:
            raise ValueError(
                f"schedule 'iterative' retrains epochs/cycles per cycle (epochs "
                f"{self.epochs} < cycles {self.cycles}); fix: set epochs >= cycles"
            )
        return self


class WeightQuantSpec(Strict):
    """How conv/linear weights are quantized (signed integers; see docs/stages/quantize.md)."""

    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    symmetric: bool = True  # False: int8 with a zero point (onnxruntime fuses it too)
    bits: Literal[8, 4] = 8  # 4: INT4 weights in the file (opset 21), run by dequantizing


class ActivationQuantSpec(Strict):
    """How activations are quantized: one range per tensor, set on the validation split."""

    symmetric: bool = False  # True: int8 with zero point 0 (S8S8; onnxruntime runs it in float)
    observer: Literal["minmax", "percentile", "entropy"] = "minmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)  # for observer: percentile


class MixedPrecisionSpec(Strict):
    """Keep the most sensitive layers in float until the val-split drop is within budget."""

    max_drop_points: float = Field(ge=0.0, le=100.0)  # top-1 points vs the float model
    max_float_layers: int | None = Field(default=None, ge=0)


class QuantizeSpec(StageBase):
    """Quantization with PT2E: QAT (fake-quant + fine-tuning), PTQ (calibration only) or
    dynamic (weights INT8, activations quantized at run time)."""

    stage: Literal["quantize"] = "quantize"
    mode: Literal["qat", "ptq", "dynamic"] = "qat"
    calibration_batches: int = Field(default=8, ge=1, le=10_000)
    weights: WeightQuantSpec = Field(default_factory=WeightQuantSpec)
    activations: ActivationQuantSpec = Field(default_factory=ActivationQuantSpec)
    mixed_precision: MixedPrecisionSpec | None = None
    # QAT: after this fraction of the stage's steps the observers (ranges) and the BN
    # statistics freeze, the standard QAT recipe; the rest of QAT and later stages train the
    # folded conv (several times faster on a CPU; pqd.quant.qat_train). null: never freeze
    freeze_after: Fraction | None = 0.1

    @model_validator(mode="before")
    @classmethod
    def _ptq_trains_no_epochs(cls, data: Any) -> Any:
        """``mode: ptq`` without ``epochs`` means no training (not the stages' default)."""
        if isinstance(data, dict) and data.get("mode") == "ptq" and "epochs" not in data:
            return {**data, "epochs": 0}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeSpec:
        if self.mode == "ptq" and self.epochs != 0:
            raise ValueError(
                "mode 'ptq' calibrates without training; fix: set epochs: 0 or mode: qat"
            )
        if self.mode == "dynamic":
            if self.activations != ActivationQuantSpec():
                raise ValueError(
                    "mode 'dynamic' quantizes activations at run time (uint8, per-batch min/max): "
                    "activation options do not apply; fix: remove 'activations' or use ptq/qat"
                )
            if self.weights.bits != 8 or not self.weights.symmetric:
                raise ValueError(
                    "mode 'dynamic' exports through onnxruntime's quantize_dynamic, which takes "
                    "symmetric 8-bit weights; fix: set weights.bits: 8 and weights.symmetric: true"
                )
            if self.mixed_precision is not None:
                raise ValueError(
                    "mixed_precision is chosen for static quantization; fix: use "
                    "mode ptq or qat, or remove mixed_precision"
                )
        return self


class FeatureKDSpec(Strict):
    """Feature distillation: student feature maps matched to the teacher's at ``points``.

    ``points``: indices into the zoo net's ``features`` (default: its
    ``default_exit_points`` and the last block) or module names such as ``net.layer1``.
    ``loss``: ``fitnet`` (MSE after a learned 1x1-conv adapter, Romero et al. 2015) or
    ``attention`` (attention transfer, Zagoruyko & Komodakis 2017). ``beta`` weighs the
    feature term (default 1 for fitnet, 1000 for attention).
    """

    points: list[int | str] | None = None
    loss: Literal["fitnet", "attention"] = "fitnet"
    beta: float | None = Field(default=None, ge=0.0, le=1e6)

    def resolved_beta(self) -> float:
        """``beta``, or the default of the chosen loss."""
        if self.beta is not None:
            return self.beta
        return 1000.0 if self.loss == "attention" else 1.0


class DistillSpec(StageBase):
    """Knowledge distillation from the baseline (teacher) into the current student:
    logits (Hinton), optionally plus intermediate feature maps (``features``)."""

    stage: Literal["distill"] = "distill"
    temperature: float = Field(default=4.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)  # weight of the KD term
    features: FeatureKDSpec | None = None


class ExitHeadSpec(Strict):
    """An exit head: ``[conv-bn-relu (channels, kernel_size, stride)] -> avg pool -> linear``."""

    channels: int = Field(default=0, ge=0, le=4096)  # 0: pool + linear only
    kernel_size: Literal[1, 3] = 3
    stride: Literal[1, 2] = 1


class ExitTarget(Strict):
    """What threshold calibration (on the validation split) must meet: exactly one of
    ``max_drop_points`` (accuracy with exits at most X points below the final head, using
    the fewest MACs) or ``max_macs_fraction`` (average MACs at most Y of the network without
    exits, at the best accuracy)."""

    max_drop_points: float | None = Field(default=None, ge=0.0, le=100.0)
    max_macs_fraction: float | None = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _exactly_one(self) -> ExitTarget:
        if (self.max_drop_points is None) == (self.max_macs_fraction is None):
            raise ValueError(
                "give exactly one of max_drop_points and max_macs_fraction; fix: "
                "e.g. target: {max_drop_points: 1.0}"
            )
        return self


class EarlyExitSpec(StageBase):
    """Exit heads after chosen ``features`` blocks, trained and calibrated (see stages doc)."""

    stage: Literal["early_exit"] = "early_exit"
    positions: list[Annotated[int, Field(ge=0)]] | None = None  # None: the net's defaults
    head: ExitHeadSpec = Field(default_factory=ExitHeadSpec)
    mode: Literal["heads", "joint"] = "heads"  # heads: backbone frozen; joint: weighted loss
    weights: list[Annotated[float, Field(ge=0.0, le=100.0)]] | None = None  # per exit; 1.0
    distill: Literal["none", "final", "teacher"] = "none"  # KD source of each exit
    temperature: float = Field(default=4.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # weight of the exits' KD term
    confidence: Literal["max_softmax", "entropy"] = "max_softmax"
    target: ExitTarget = Field(default_factory=lambda: ExitTarget(max_drop_points=1.0))
    calibration_batches: int = Field(default=8, ge=1, le=10_000)  # quantized: new observers

    @model_validator(mode="after")
    def _weights_match_positions(self) -> EarlyExitSpec:
        if self.positions is not None and len(set(self.positions)) != len(self.positions):
            raise ValueError("positions lists a block twice; fix: list each position once")
        if (
            self.weights is not None
            and self.positions is not None
            and len(self.weights) != len(self.positions)
        ):
            raise ValueError(
                f"weights has {len(self.weights)} entries for "
                f"{len(self.positions)} positions; fix: give one weight per exit"
            )
        return self


StageSpec = Annotated[
    PruneSpec | PruneChannelsSpec | QuantizeSpec | DistillSpec | EarlyExitSpec,
    Field(discriminator="stage"),
]
"""The stage set, declared here once: each spec's ``stage`` default is its name, and the
module ``pqd.stages.<name>`` registers its ``apply`` under that name."""
STAGE_SPECS: tuple[type[StageBase], ...] = get_args(get_args(StageSpec)[0])
STAGE_NAMES: tuple[str, ...] = tuple(s.model_fields["stage"].default for s in STAGE_SPECS)


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


class SearchSpec(Strict):
    """``pqd search``: run the recipe's stages in every order (and pairwise), then rank them.

    ``budget`` gives each POSITION in an order a percentage of ``total_epochs`` (the first
    stage of every order gets ``budget[0]`` %, whatever stage it is); ``None`` splits evenly.
    ``total_epochs`` ``None`` means the sum of the stages' own ``epochs``. Every trial uses
    the one shared baseline, data and seed; ``seeds`` repeats every trial (mean and spread).
    ``criterion``: higher test top-1 wins when the paired comparison of the two orders on
    the same test images is significant at ``alpha`` (exact McNemar pooled over seeds,
    Holm-corrected over the pairs; :mod:`pqd.stats`) and at least ``min_effect_points``
    (the smallest difference worth reporting); otherwise batch-1 p50 latency decides when
    it differs by more than ``tie_latency`` (a fraction), else the pair is a tie.
    """

    mode: Literal["permutations", "pairwise", "both"] = "both"
    total_epochs: int | None = Field(default=None, ge=0, le=10_000)
    budget: list[Annotated[float, Field(ge=0.0, le=100.0)]] | None = None
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=lambda: [0], min_length=1
    )
    references: bool = True
    criterion: Literal["accuracy"] = "accuracy"
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    min_effect_points: float = Field(default=0.0, ge=0.0, le=100.0)
    tie_latency: float = Field(default=0.10, ge=0.0, lt=1.0)
    # flag a Pareto-front point whose worst class drops by more than this many points
    # against the baseline (the audit's largest per-class drop); None: no flag
    flag_class_drop: float | None = Field(default=None, ge=0.0, le=100.0)

    @model_validator(mode="before")
    @classmethod
    def _tie_points_gone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tie_points" in data:
            raise ValueError(
                "search.tie_points is gone: two orders now tie unless a paired test on the "
                "same test images says otherwise; fix: delete tie_points (set "
                "min_effect_points for the smallest difference worth reporting, alpha for "
                "the test's level)"
            )
        return data

    @model_validator(mode="after")
    def _seeds_unique(self) -> SearchSpec:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("search.seeds lists a seed twice; fix: list each seed once")
        return self


class Recipe(Strict):
    """A whole pqd job."""

    name: str = Field(default="run", min_length=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    export: ExportSpec = Field(default_factory=ExportSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    search: SearchSpec | None = None  # only ``pqd search`` reads it

    @model_validator(mode="after")
    def _search_fits_stages(self) -> Recipe:
        if self.search is None:
            return self
        names = [s.stage for s in self.stages]
        if len(names) < 2:
            raise ValueError(
                f"search needs at least 2 stages to order (the recipe has "
                f"{len(names)}); fix: list 2 or more stages under stages:"
            )
        if len(set(names)) != len(names):
            raise ValueError(
                f"search orders distinct stages, but {' -> '.join(names)} repeats "
                "one; fix: list each stage once (set its epochs via the budget)"
            )
        budget = self.search.budget
        if budget is not None:
            if len(budget) != len(names):
                raise ValueError(
                    f"search.budget has {len(budget)} entries for {len(names)} stages; fix: "
                    f"give one percentage per position, e.g. {_even_budget(len(names))}"
                )
            if abs(sum(budget) - 100.0) > 0.1:
                raise ValueError(
                    f"search.budget sums to {sum(budget):g}, not 100; fix: give "
                    "percentages of search.total_epochs that add up to 100"
                )
        return self

    @model_validator(mode="after")
    def _one_early_exit(self) -> Recipe:
        if sum(s.stage == "early_exit" for s in self.stages) > 1:
            raise ValueError(
                "early_exit appears more than once; fix: keep one early_exit stage "
                "(later stages keep training its exits)"
            )
        return self

    def early_exit(self) -> EarlyExitSpec | None:
        """The recipe's early_exit stage, if it has one."""
        return next((s for s in self.stages if isinstance(s, EarlyExitSpec)), None)

    def stage_train(self, index: int) -> TrainSpec:
        """Training settings of stage ``index``: recipe ``train`` with the stage's overrides."""
        return merge_train(self.train, self.stages[index].train)

    def baseline_train(self) -> TrainSpec:
        """Training settings of the baseline."""
        return merge_train(self.train, self.baseline.train)

    def order(self) -> str:
        """The stage order as text, e.g. ``prune -> quantize -> distill``."""
        return " -> ".join(s.stage for s in self.stages) or "(no stages)"


def _even_budget(n: int) -> list[float]:
    return [round(100 / n, 2)] * n


# ---------------------------------------------------------------------------- loading


def _closest(err: dict[str, Any]) -> str:
    """`` (did you mean ...?)`` for a misspelt key, stage name or choice (else "")."""
    import re

    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(Recipe, err["loc"][:-1])
        return did_you_mean(err["loc"][-1], allowed.split(", ") if allowed else [])
    if kind == "union_tag_invalid":
        return did_you_mean(ctx.get("tag", ""), STAGE_NAMES)
    if kind in ("literal_error", "enum") and isinstance(err.get("input"), str):
        return did_you_mean(err["input"], re.findall(r"'([^']*)'", str(ctx.get("expected"))))
    return ""


def _fix_for(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        return "remove it or fix its spelling" + (f" (allowed: {allowed})" if allowed else "")
    if kind in ("literal_error", "enum"):
        return f"use one of {ctx.get('expected', 'the allowed values')}"
    if kind == "union_tag_invalid":
        return f"use one of {ctx.get('expected_tags', ', '.join(STAGE_NAMES))}"
    if kind == "union_tag_not_found":
        return f"add 'stage: <name>' with one of {', '.join(STAGE_NAMES)}"
    if kind == "missing":
        return "add it"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"use a value {bounds[kind]} {limit}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "give a value of the right type"
    if kind == "too_short":
        return "give at least one entry"
    return "correct the value"


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """Field names of the section at ``loc`` (best effort, for error hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                # discriminated stage union: the tag appears in loc
                current = dict(zip(STAGE_NAMES, STAGE_SPECS, strict=True)).get(str(part))
                continue
            current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return ", ".join(current.model_fields)
    return ""


def _inner_model(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _format_validation(exc: ValidationError, source: str) -> RecipeError:
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in STAGE_NAMES or err["loc"][0] != "stages")
    msg = err["msg"]
    fix: str | None = _fix_for(err, Recipe)
    if err["type"] == "value_error":  # our validators word problem and fix themselves
        msg, _, fix = str(err["ctx"]["error"]).partition("; fix: ")
        fix = fix or None
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown stage {err['ctx'].get('tag')!r}"
    elif err["type"] == "union_tag_not_found":
        msg = "the stage has no 'stage' key"
    elif err["type"] not in ("missing", "extra_forbidden") and "input" in err:
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = f"{msg} (got {shown})"
    msg += _closest(err)
    extra = len(errors) - 1
    more = f" (+{extra} more problem{'s' if extra > 1 else ''})" if extra else ""
    where = f"{loc}: " if loc else ""
    return RecipeError(f"{source}: {where}{msg}{more}", fix)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b.0.c=value`` strings; values are read as YAML scalars/lists."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise RecipeError(
                f"override {item!r} is not of the form key.path=value",
                "write e.g. stages.0.sparsity=0.7 or baseline.epochs=5",
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a plain dict (list items by index); returns ``data``."""
    for path, value in parse_overrides(overrides):
        node: Any = data
        for i, part in enumerate(path[:-1]):
            node = _child(node, part, path[: i + 1], create=True)
        last = path[-1]
        if isinstance(node, list):
            idx = _index(node, last, path)
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(
                f"override {'.'.join(path)}: {'.'.join(path[:-1])} is not a section",
                "override a key inside a mapping",
            )
    return data


def _index(node: list[Any], part: str, path: list[str]) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise RecipeError(
            f"override {'.'.join(path)}: no list item {part!r} (the list has {len(node)})",
            f"use an index from 0 to {len(node) - 1}",
        )
    return int(part)


def _child(node: Any, part: str, path: list[str], *, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise KeyError(part)
            node[part] = {}
        return node[part]
    raise RecipeError(
        f"override {'.'.join(path)}: {'.'.join(path[:-1])} is not a section",
        "override a key inside a mapping",
    )


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate plain data into a :class:`Recipe`, or raise a one-line RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: the top level must be a mapping (got {type(data).__name__})",
            "start the file with keys such as model:, data:, stages:",
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {str(p)!r} does not exist", "give the path of a YAML recipe")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a UTF-8 text file", "give a YAML recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise RecipeError(
            f"{p}: malformed YAML{where}: {problem}",
            "fix the YAML syntax (indentation, colons, quotes)",
        ) from None
    if data is None:
        data = {}
    if isinstance(data, dict):
        anchor_paths(data, p.parent)  # paths in the file: relative to the file
    if overrides:
        if not isinstance(data, dict):
            return recipe_from_dict(data, str(p))
        data = apply_overrides(data, overrides)
        anchor_paths(data, Path.cwd())  # paths on the command line: relative to the shell
        recipe = recipe_from_dict(data, str(p))
        if any(path == ["data", "root"] for path, _ in parse_overrides(overrides)):
            recipe.data._root_from = "override"
        return recipe
    return recipe_from_dict(data, str(p))


RECIPE_PATHS = (("data", "root"), ("baseline", "checkpoint"))
"""The recipe's file-system paths (section, key)."""


def anchor_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths of :data:`RECIPE_PATHS` in plain recipe data absolute, taken
    relative to ``folder`` (``~`` expanded); other values are left for validation.

    Args:
        data: the recipe as plain data (changed in place).
        folder: the folder relative paths start from.
    """
    for section, key in RECIPE_PATHS:
        node = data.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(key), str):
            continue
        value = os.path.expanduser(node[key].strip())
        if value:
            node[key] = os.path.normpath(os.path.join(os.path.abspath(folder), value))


def stable_dump(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON data without the fields left at their defaults (each stage keeps
    its ``stage`` name): what resume fingerprints and search trial keys hash, so that a field
    added to pqd later, with a default, does not make finished runs look different.

    Args:
        recipe: the recipe.

    Returns:
        The dict (``stages`` always present, as a list).
    """
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data["stages"] = [
        {"stage": spec.stage, **spec.model_dump(mode="json", exclude_defaults=True)}
        for spec in recipe.stages
    ]
    return data


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of the fully resolved recipe (defaults included); loads back equal."""
    data = recipe.model_dump(mode="json")
    if data.get("search") is None:
        data.pop("search", None)  # a plain run recipe stays as it was
    return yaml.safe_dump(data, sort_keys=False)
