"""The stage specs, one per compression stage (prune, prune_channels, quantize, distill,
early_exit) with their nested options, and :data:`StageSpec`, the stage set declared once:
what a recipe's ``stages:`` list may hold and what :mod:`pqd.stages` registers under."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, model_validator

from pqd.recipe.base import Fraction, Strict
from pqd.recipe.sections import TrainOverride


class StageBase(Strict):
    """Fields every stage has: its fine-tuning epochs and training overrides."""

    epochs: int = Field(default=2, ge=0, le=10_000)
    train: TrainOverride = Field(default_factory=TrainOverride)


Criterion = Literal["magnitude", "taylor", "fisher", "snip", "grasp", "movement"]


def _check_cycles(schedule: str, epochs: int, cycles: int) -> None:
    """``schedule: iterative`` retrains ``epochs // cycles`` epochs per cycle: at least one."""
    if schedule == "iterative" and epochs < cycles:
        raise ValueError(
            f"schedule 'iterative' retrains epochs/cycles per cycle (epochs "
            f"{epochs} < cycles {cycles}); fix: set epochs >= cycles"
        )


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
        _check_cycles(self.schedule, self.epochs, self.cycles)
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
        _check_cycles(self.schedule, self.epochs, self.cycles)
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
