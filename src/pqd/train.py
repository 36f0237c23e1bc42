"""The one fine-tune/evaluate loop used by the baseline and by every stage.

SGD (Nesterov) or AdamW, one-cycle / cosine / constant schedules, label
smoothing, an optional exponential moving average of the weights (torch's
``AveragedModel``), bf16 autocast + channels_last on CPUs that support bf16, CUDA
autocast on GPUs, and hooks: a loss hook (knowledge distillation) and a
parameter hook that runs after every optimizer step (re-applying pruning masks).

Models are either eager ``nn.Module`` s or PT2E graphs (``torch.fx.GraphModule``
after ``prepare_qat_pt2e``). Graphs train in fp32 (bf16 autocast fails on the QAT
graph) and switch train/eval with ``move_exported_model_to_train/eval``; their
observers are frozen while evaluating so that evaluation never moves the
quantization ranges.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.average import ema_model, load_average
from pqd.errors import PqdError
from pqd.progress import bar as progress_bar
from pqd.progress import on_terminal, phase
from pqd.recipe import TrainSpec

LossHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits, targets, inputs) -> scalar`` replacing cross-entropy (e.g. KD)."""

StepHook = Callable[[nn.Module], None]
"""Runs after every optimizer step (e.g. re-apply pruning masks)."""


class BatchSource(Protocol):
    """What ``fit``/``evaluate`` iterate: ``pqd.data.Loader`` satisfies it."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...


@dataclass
class StepModules:
    """What :func:`fit` runs at each step in place of the model it trains: a module sharing
    the model's parameters (e.g. a faster view of a QAT graph, :mod:`pqd.quant.qat_train`).

    ``module_at(step, total)`` gives the module for 0-based optimizer step ``step``;
    ``autocast``: the modules accept bf16 activations (autocast where the CPU has fast bf16,
    as for eager models); ``info()`` says what happened, for the stage's record.
    """

    module_at: Callable[[int, int], nn.Module]
    autocast: bool = False
    info: Callable[[], dict[str, Any]] = dict


class TrainingDiverged(PqdError):
    """The loss or the gradient norm became NaN/inf, or the gradient norm exceeded
    ``train.max_grad_norm``: the stage stops instead of training on garbage."""


DIVERGED_FIX = (
    "lower the learning rate (train.lr or the stage's train.lr) or set "
    "train.grad_clip, then run again with --resume: finished steps are kept"
)


def grad_norm_fix(first: bool) -> str:
    """The advice for a gradient norm above ``train.max_grad_norm``.

    The norm is checked before ``train.grad_clip`` clips it, and the first step's gradient
    comes from the weights the stage started with, whatever the learning rate: at the
    first step only the limit itself can change the outcome.

    Args:
        first: the norm is the first step's of this training run.

    Returns:
        The fix text for :class:`TrainingDiverged`.
    """
    limit = (
        "raise train.max_grad_norm (the stage's train.max_grad_norm: null turns the "
        "check off) if such norms are normal for this model"
    )
    if first:
        return (
            f"the first step's gradient does not depend on the learning rate or "
            f"train.grad_clip (clipping comes after this check): {limit}, then run "
            "again with --resume: finished steps are kept"
        )
    return (
        "lower the learning rate (train.lr or the stage's train.lr) or "
        + limit
        + " (train.grad_clip clips after this check), then run again with --resume: "
        "finished steps are kept"
    )


@dataclass
class FitProgress:
    """Where a ``fit`` stands after a whole epoch: enough to continue it exactly.

    ``optimizer`` is ``optimizer.state_dict()``, ``loader`` the train loader's
    ``state_dict()`` (None for loaders without one), ``rng`` the global torch CPU RNG state,
    ``ema`` the weight average's ``state_dict()`` (``train.ema``; None without one),
    ``seconds`` the wall seconds the step had run when it was saved, over every process
    that ran it (filled in by the run folder that saves it; 0 from ``fit``).
    """

    epoch: int  # epochs finished
    step: int  # optimizer steps taken
    optimizer: dict[str, Any]
    loader: dict[str, Any] | None
    rng: torch.Tensor
    losses: list[float] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0


@dataclass
class FitResult:
    """What one ``fit`` call did: epochs, optimizer steps, wall seconds, mean loss per epoch."""

    epochs: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------- model kinds


def is_graph(model: nn.Module) -> TypeGuard[torch.fx.GraphModule]:
    """True for an exported PT2E graph module (QAT-prepared or converted)."""
    return isinstance(model, torch.fx.GraphModule)


def load_graph_weights(eager: nn.Module, graph: nn.Module) -> list[str]:
    """Load the weights and buffers of a PT2E graph into ``eager``, a model of the same
    architecture (the graph's state_dict has every eager key, plus fake-quant buffers).

    Args:
        eager: the eager model to load into (in place).
        graph: the graph module to take the values from.

    Returns:
        The eager keys the graph lacks; when there are any, nothing is loaded.
    """
    state = graph.state_dict()
    wanted = eager.state_dict()
    missing = [k for k in wanted if k not in state]
    if not missing:
        eager.load_state_dict({k: state[k].detach().clone() for k in wanted})
    return missing


def has_graph(model: nn.Module) -> bool:
    """True when ``model`` is or holds an exported graph (a multi-exit net's QAT parts):
    such models train in fp32 and keep their memory format."""
    return any(isinstance(m, torch.fx.GraphModule) for m in model.modules())


def _fake_quant_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "observer_enabled")]


def set_train(model: nn.Module, train: bool) -> None:
    """Switch train/eval for eager modules and exported graphs alike."""
    if is_graph(model):
        from torchao.quantization.pt2e import (
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        import pqd._pt2e_cache as _pt2e_cache

        _pt2e_cache.install()  # the switch re-traces patterns: trace them once

        (move_exported_model_to_train if train else move_exported_model_to_eval)(model)
        # exported graphs do not keep .training meaningful (the stub of Module.__setattr__
        # takes tensors and modules only; any value works at runtime)
        model._pqd_training = train  # type: ignore[assignment]
    else:
        model.train(train)


def is_training(model: nn.Module) -> bool:
    """The mode last set with :func:`set_train` (graphs) or ``.training`` (eager)."""
    return bool(getattr(model, "_pqd_training", False)) if is_graph(model) else model.training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate without side effects: eval BN, frozen observers, previous state restored."""
    was_training = is_training(model)
    fqs = _fake_quant_modules(model)
    saved = [fq.observer_enabled.clone() for fq in fqs]
    for fq in fqs:
        fq.observer_enabled[0] = 0
    set_train(model, False)
    try:
        yield
    finally:
        for fq, s in zip(fqs, saved, strict=True):
            fq.observer_enabled.copy_(s)
        set_train(model, was_training)


# ---------------------------------------------------------------------------- precision


def autocast_dtype(
    cfg_amp: str, model: nn.Module, device: torch.device, *, graph_ok: bool = False
) -> torch.dtype | None:
    """The autocast dtype to train/evaluate ``model`` with, or None for fp32 (exported graphs
    run in fp32 unless ``graph_ok``: their fake-quantizers reject bf16 inputs)."""
    if cfg_amp == "off" or (has_graph(model) and not graph_ok):
        return None
    if device.type == "cuda":
        if cfg_amp == "fp16":
            return torch.float16
        if cfg_amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if cfg_amp == "fp16":
        return None  # fp16 autocast on CPU is slow and not worth it
    if cfg_amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX; Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in text or "amx_bf16" in text


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: nn.Module, cfg: TrainSpec, device: torch.device) -> nn.Module:
    """Move to ``device`` and, for eager conv nets, to channels_last when asked."""
    model.to(device)
    if cfg.channels_last and not has_graph(model):
        # torch's stub of Module.to lacks memory_format (it exists at runtime)
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


# ---------------------------------------------------------------------------- optimizer


def build_optimizer(model: nn.Module, cfg: TrainSpec) -> torch.optim.Optimizer:
    """SGD/AdamW with weight decay on weights (ndim > 1) only, not on BN/bias."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, total: int, cfg: TrainSpec) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based) of ``total``.

    A linear warm-up over the first ``cfg.warmup`` fraction of steps, then
    ``constant``, ``cosine`` (to zero) or ``onecycle`` (linear to zero).
    """
    if total <= 0:
        return 1.0
    warm_steps = cfg.warmup * total
    if step < warm_steps:
        return (step + 1) / warm_steps
    if cfg.schedule == "constant":
        return 1.0
    rest = (step - warm_steps) / max(1.0, total - warm_steps)
    if cfg.schedule == "onecycle":
        return max(0.0, 1.0 - rest)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


# ---------------------------------------------------------------------------- loops


def fit(
    model: nn.Module,
    train: BatchSource,
    cfg: TrainSpec,
    epochs: int,
    *,
    device: torch.device,
    loss_fn: LossHook | None = None,
    after_step: StepHook | None = None,
    on_step: Callable[[int, int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    resume: FitProgress | None = None,
    on_epoch: Callable[[FitProgress], None] | None = None,
    steps: StepModules | None = None,
    on_average: StepHook | None = None,
) -> FitResult:
    """Train ``model`` in place for ``epochs`` passes over ``train``.

    ``on_step(step, total)`` runs before each optimizer step (schedules such
    as gradual pruning hook in there); ``after_step(model)`` runs after it.
    ``steps``, if given, names the module each step runs instead of ``model`` (sharing its
    parameters: the optimizer, hooks and checkpoints see ``model``).
    ``on_epoch(progress)`` runs after every epoch (the pipeline checkpoints there);
    ``resume`` continues from such a progress (the caller has restored the weights).
    With ``cfg.ema`` the model ends with the moving average of its weights, and then
    ``on_average(model)`` runs once (re-applying pruning masks, which the average of
    weights from before a mask changed does not keep).
    A NaN/inf loss, a non-finite gradient norm or one above ``cfg.max_grad_norm``
    raises :class:`TrainingDiverged` naming the epoch and step.
    """
    start = time.perf_counter()
    total = epochs * len(train)
    result = FitResult(epochs=epochs, steps=0, seconds=0.0)
    if total == 0:
        return result
    opt = build_optimizer(model, cfg)
    averaged = None if cfg.ema is None else ema_model(model, cfg.ema, buffers=not has_graph(model))
    first_epoch, step = _resumed(resume, opt, train, result, averaged)
    first_step = step
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = autocast_dtype(cfg.amp, model, device, graph_ok=steps is not None and steps.autocast)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    # graphs keep their memory format, but the fast views of a QAT graph take channels_last
    # activations (the convs run about 7% faster)
    channels_last = cfg.channels_last and (not has_graph(model) or steps is not None)
    set_train(model, True)
    t_epoch = time.perf_counter()
    shown = {"show": progress, "leave": False, "dynamic_ncols": True}
    bar = progress_bar(total=total, initial=step, desc=desc, unit="step", **shown)
    try:
        for epoch in range(first_epoch, epochs):
            loss_sum, n = 0.0, 0
            for x, y in train:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(step, total, cfg)
                if on_step is not None:
                    on_step(step, total)
                net = model if steps is None else steps.module_at(step, total)
                with _autocast(device, dtype):
                    logits = net(x)
                loss = _loss(logits.float(), y, x, loss_fn, cfg.label_smoothing)
                at = f"epoch {epoch + 1}/{epochs}, step {step + 1}/{total}"
                diverged = f"{desc}: training diverged at {at}"
                _optimizer_step(loss, opt, scaler, params, cfg, diverged, step == first_step)
                if after_step is not None:
                    after_step(model)
                if averaged is not None:
                    averaged.update_parameters(model)
                step += 1
                loss_sum += loss.item() * y.numel()
                n += y.numel()
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
            result.losses.append(loss_sum / max(1, n))
            if not (progress and on_terminal()):  # (a bar on a terminal shows it already)
                phase(
                    f"{desc}: epoch {epoch + 1}/{epochs}, loss {result.losses[-1]:.3f}, "
                    f"{time.perf_counter() - t_epoch:.0f} s"
                )
            t_epoch = time.perf_counter()
            if on_epoch is not None:
                on_epoch(_progress(epoch + 1, step, opt, train, result.losses, averaged))
    finally:
        bar.close()
        set_train(model, False)
    if averaged is not None:
        load_average(model, averaged)
        if on_average is not None:
            on_average(model)
    result.steps = step
    result.seconds = time.perf_counter() - start
    return result


def _loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    loss_fn: LossHook | None,
    label_smoothing: float,
) -> torch.Tensor:
    """The step's loss: ``loss_fn(logits, y, x)``, or cross-entropy without one."""
    if loss_fn is None:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return loss_fn(logits, y, x)


def _resumed(
    resume: FitProgress | None,
    opt: torch.optim.Optimizer,
    train: BatchSource,
    result: FitResult,
    averaged: torch.optim.swa_utils.AveragedModel | None,
) -> tuple[int, int]:
    """Optimizer, loader position, RNG, losses and weight average restored from ``resume``;
    the epoch and step to continue from (0, 0 without one)."""
    if resume is None:
        return 0, 0
    if averaged is not None and resume.ema is not None:
        averaged.load_state_dict(resume.ema)
    opt.load_state_dict(resume.optimizer)
    if resume.loader is not None and hasattr(train, "load_state_dict"):
        train.load_state_dict(resume.loader)
    torch.set_rng_state(resume.rng)
    result.losses = list(resume.losses)
    return resume.epoch, resume.step


def _progress(
    epoch: int,
    step: int,
    opt: torch.optim.Optimizer,
    train: BatchSource,
    losses: list[float],
    averaged: torch.optim.swa_utils.AveragedModel | None = None,
) -> FitProgress:
    """What an epoch's checkpoint holds to continue after it."""
    return FitProgress(
        epoch=epoch,
        step=step,
        optimizer=opt.state_dict(),
        loader=train.state_dict() if hasattr(train, "state_dict") else None,
        rng=torch.get_rng_state(),
        losses=list(losses),
        ema=None if averaged is None else averaged.state_dict(),
    )


def _optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: list[nn.Parameter],
    cfg: TrainSpec,
    diverged: str,
    first: bool,
) -> None:
    """Backward, the divergence checks, then the optimizer step.

    Args:
        loss: the step's loss (checked finite before the backward pass).
        opt, scaler: the optimizer and, for fp16, its gradient scaler.
        params: the trained parameters (clipped, their gradient norm checked).
        cfg: ``grad_clip`` and ``max_grad_norm``.
        diverged: the start of the error line (who diverged, at which epoch and step).
        first: this is the first step of the call (the fix names the learning rate then).

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm, or a norm above
            ``cfg.max_grad_norm``.
    """
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{diverged}: the loss is {loss.item()}", DIVERGED_FIX)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if cfg.grad_clip is not None:  # returns the norm before clipping
        norm = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    else:
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
    # (with an fp16 GradScaler, inf gradients are routine: the scaler skips the step)
    if scaler is None and not math.isfinite(norm):
        raise TrainingDiverged(f"{diverged}: the gradient norm is {norm}", DIVERGED_FIX)
    if cfg.max_grad_norm is not None and norm > cfg.max_grad_norm:
        raise TrainingDiverged(
            f"{diverged}: the gradient norm {norm:.4g} exceeds "
            f"train.max_grad_norm={cfg.max_grad_norm:g}",
            grad_norm_fix(first),
        )
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: BatchSource,
    *,
    device: torch.device,
    amp: str = "off",
    channels_last: bool = False,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32, on CPU) and targets for every batch of ``loader``."""
    dtype = autocast_dtype(amp, model, device)
    channels_last = channels_last and not has_graph(model)
    outs, ys = [], []
    with eval_mode(model):
        for x, y in progress_bar(loader, desc=desc, unit="batch", show=progress, leave=False):
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, dtype):
                out = model(x)
            outs.append(out.float().cpu())
            ys.append(y.cpu())
    if not outs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (fraction 0-1) of predicted classes against labels; NaN when empty."""
    if labels.numel() == 0:
        return float("nan")
    return (predicted == labels).float().mean().item()


def evaluate(model: nn.Module, loader: BatchSource, *, device: torch.device, **kw: Any) -> float:
    """Top-1 accuracy (fraction 0-1) of ``model`` on ``loader``; NaN for an empty loader."""
    logits, y = predict(model, loader, device=device, **kw)
    return top1(logits.argmax(1), y)


def soft_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    averaged over the batch (the one KD loss: the distill stage and exit heads use it).

    Args:
        student: the student's logits ``[N, classes]``.
        teacher: the teacher's logits ``[N, classes]`` (no gradient needed).
        temperature: the softening temperature ``T``.

    Returns:
        The scalar loss.
    """
    return F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)


def kd_loss(
    teacher: nn.Module,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    *,
    device: torch.device,
    amp: str = "auto",
) -> LossHook:
    """Hinton KD: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``.

    The teacher runs in eval mode without gradients (bf16 autocast where fast).
    """
    dtype = autocast_dtype(amp, teacher, device)
    set_train(teacher, False)

    eager = not has_graph(teacher)

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if eager and x.dim() == 4:  # an eager conv teacher runs channels_last (as it trained)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(device, dtype):
            t_logits = teacher(x)
        t_logits = t_logits.float()
        soft = soft_kd(logits, t_logits, temperature)
        hard = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return alpha * soft + (1.0 - alpha) * hard

    return loss
