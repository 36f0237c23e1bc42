"""What flows between stages, and the small contract every stage satisfies.

A stage is a function ``apply(state, spec, ctx) -> state`` registered with
``@register_stage(name)``. It may replace ``state.model`` (quantize turns the
eager model into a PT2E graph) and must keep what earlier stages established:
``ctx.fit`` re-applies ``state.masks`` after every optimizer step, and a
quantized graph keeps its fake-quantizers whatever trains it next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from pqd.models.multi_exit import MultiExitNet
from pqd.prune.importance import LossFn, cross_entropy
from pqd.prune.masks import KD_SCORE_ALPHA, KD_SCORE_TEMPERATURE
from pqd.quant.qat_train import qat_steps
from pqd.recipe import AugmentSpec, TrainSpec
from pqd.state import MaskKeeper, State
from pqd.train import FitResult, LossHook, StepHook, fit, kd_loss

if TYPE_CHECKING:
    from pqd.dataset import Dataset


class Stage(Protocol):
    """``apply(state, spec, ctx) -> state``: one compression technique."""

    def __call__(self, state: State, spec: Any, ctx: Context) -> State: ...


@dataclass
class Context:
    """What a stage reads besides the state and its spec: the data, the device, the teacher,
    and its own settings (set by :func:`pqd.engine.apply_stages` before each stage). A stage
    never sees the recipe nor the other stages.

    Attributes:
        data: the typed data (``pqd.data.Dataset``: uint8 images, labels, mean/std).
        device: where training runs.
        teacher: the frozen model the run started from (KD target, reference MACs).
        train: the stage's training settings (run settings merged with its overrides).
        seed: the stage's seed (shuffling, augmentation, re-initialisation).
        augment: training augmentation (random crop after padding, flip, cutout).
        fresh_model: builds a fresh, unpruned eager model like the run's (random weights
            from the current RNG): channel surgery replays on it, a QAT graph is unwrapped
            into it, ``at_init`` pruning re-initialises from it.
        quantize_later: this or a later stage quantizes (an INT8 latency target then
            measures INT8 candidates).
        threads: measurement threads (latency targets).
        target: resolved deployment target (:mod:`pqd.target`): the INT8 weight range.
        progress: show progress bars.
        run: the run folder (:class:`pqd.resume.RunFolder`): per-epoch checkpoints and
            resume inside a stage; None: neither.
        forward_loop: the user's calibration loop (``forward_loop(model)``), or None: pqd
            calibrates on its own batches.
        step: the run-folder step of the stage (stage i is step i + 1).
        desc: progress-bar label, e.g. ``[2/3] quantize``.
        fit_calls: ``fit`` calls so far in the current stage (reset per stage).
    """

    data: Dataset  # pqd.data.Dataset
    device: torch.device
    teacher: nn.Module
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 0
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    fresh_model: Callable[[], nn.Module] | None = None
    quantize_later: bool = False
    threads: int = 1
    target: str = "portable"
    progress: bool = True
    run: Any = None
    forward_loop: Callable[[nn.Module], None] | None = None
    step: int = 0
    desc: str = "baseline"
    fit_calls: int = 0

    def new_model(self) -> nn.Module:
        """A fresh unpruned eager model (see ``fresh_model``), on the CPU."""
        if self.fresh_model is None:
            raise RuntimeError("this stage needs Context.fresh_model (a fresh-model factory)")
        return self.fresh_model()

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        augment: bool = False,
        shuffle: bool = False,
    ) -> Any:
        """A tensor-resident ``pqd.data.Loader`` over ``split`` (train | val | test)."""
        from pqd.data import Loader

        x = getattr(self.data, f"{split}_x")
        y = getattr(self.data, f"{split}_y")
        aug = self.augment
        return Loader(
            x,
            y,
            batch_size,
            shuffle=shuffle,
            augment=augment,
            crop=aug.crop,
            crop_padding=aug.crop_padding,
            pad_mode=aug.pad_mode,
            min_scale=aug.min_scale,
            flip=aug.flip,
            cutout=aug.cutout,
            device=self.device,
            seed=seed,
        )

    def example_input(self, batch: int = 2) -> torch.Tensor:
        """A float input in [0, 1] shaped like the data (batch 2: see export pitfalls)."""
        _, c, h, w = self.data.train_x.shape
        return torch.rand(batch, c, h, w, device=self.device)

    def teacher_loss(self, temperature: float, alpha: float) -> LossHook:
        """Hinton KD against ``teacher`` (:func:`pqd.train.kd_loss`) with the stage's label
        smoothing and autocast: the distill stage's logit loss, and early_exit's with
        ``distill: teacher``.

        Args:
            temperature: the softmax temperature of the KD term.
            alpha: the KD term's weight (``1 - alpha`` on cross-entropy).

        Returns:
            The loss hook ``loss(logits, y, x)``.
        """
        cfg = self.train
        return kd_loss(
            self.teacher, temperature, alpha, cfg.label_smoothing, device=self.device, amp=cfg.amp
        )

    def fit(
        self,
        state: State,
        cfg: TrainSpec,
        epochs: int,
        *,
        seed: int,
        loss_fn: LossHook | None = None,
        on_step: Callable[[int, int], None] | None = None,
        after_step: StepHook | None = None,
        desc: str = "train",
        hook_state: dict[str, Any] | None = None,
        freeze_at: float | None = None,
    ) -> FitResult:
        """Fine-tune ``state.model`` on the train split, keeping pruned weights at zero
        (and, on a multi-exit net, training its exits alongside: ``with_exit_losses``).

        A QAT graph trains through the fast views of :mod:`pqd.quant.qat_train` (bf16 where
        the CPU has it; the folded conv once frozen); ``freeze_at`` (fraction of this fit's
        steps) freezes its observers and BN statistics there. What happened goes into
        ``state.info["qat_training"]``.

        ``after_step`` (e.g. a movement-score tracker) runs after the masks are re-applied.

        With ``self.run`` set, every epoch is checkpointed and a killed stage continues
        after its last saved epoch (weights, masks, optimizer, RNG states and ``hook_state``,
        a JSON-able dict the stage's ``on_step`` keeps its own progress in, are restored).
        Only the stage's first ``fit`` call continues mid-way when the stage fits several
        times, and none does with an ``after_step`` tracker (its state is not saved): the
        pipeline replays those stages from their start, which gives the same result.
        """
        call = self.fit_calls
        self.fit_calls += 1
        resume, on_epoch = None, None
        if self.run is not None and epochs > 0 and after_step is None:
            resume, on_epoch = self.run.epoch_hooks(
                self.step, state.model, state.masks, hook_state, desc, call
            )
        keep = MaskKeeper(state.model, state.masks)
        keep(state.model)
        train = self.loader("train", cfg.batch_size, seed=seed, augment=True, shuffle=True)
        hooks = [h for h in (keep if state.masks else None, after_step) if h is not None]

        def after(model: nn.Module) -> None:
            for h in hooks:
                h(model)

        net = state.model
        exit_net = net if isinstance(net, MultiExitNet) and net.num_exits > 0 else None
        if exit_net is not None:  # exits stay attached and keep training (see pqd.exits.heads)
            from pqd.exits.heads import with_exit_losses

            loss_fn = with_exit_losses(exit_net, loss_fn, self.teacher, cfg)
            exit_net.collect_exits = True
        steps = qat_steps(net, freeze_at)
        try:
            return fit(
                net,
                train,
                cfg,
                epochs,
                device=self.device,
                loss_fn=loss_fn,
                after_step=after if hooks else None,
                on_average=keep,
                on_step=on_step,
                desc=desc,
                progress=self.progress,
                resume=resume,
                on_epoch=on_epoch,
                steps=steps,
            )
        finally:
            if steps is not None:
                state.info["qat_training"] = steps.info()
            if exit_net is not None:
                exit_net.collect_exits = False
                exit_net.exit_logits = []


# ---- what the two pruning stages share: batches and a loss to score weights with


def score_batches(ctx: Context, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training batches (no augmentation, stage-seeded shuffle) for scoring."""
    batch = min(ctx.train.batch_size, 128)
    loader = ctx.loader("train", batch, seed=ctx.seed, shuffle=True)
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) >= count:
            break
    return out


def scoring_loss(kind: str, ctx: Context) -> LossFn:
    """Cross-entropy, or the distill stage's KD loss against ``ctx.teacher`` (``kd``).

    While the student still equals the teacher the KD term has zero gradient and the
    scores come from its cross-entropy share (``1 - KD_SCORE_ALPHA``).
    """
    if kind == "ce":
        return cross_entropy
    return kd_loss(
        ctx.teacher, KD_SCORE_TEMPERATURE, KD_SCORE_ALPHA, 0.0, device=ctx.device, amp="off"
    )
