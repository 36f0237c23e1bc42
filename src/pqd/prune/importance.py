"""Importance criteria: per-weight scores, kept apart from masks and channel surgery.

Every criterion is a function ``score(model, batches, loss_fn, names) -> {name: scores}``
returning one float tensor per named parameter, shaped like it; a HIGHER score means
MORE important (kept longer). Masks (:mod:`pqd.prune.masks`) and channel surgery
(:mod:`pqd.prune.channels`) only ever read these dicts.

``batches`` is a list of ``(x, y)`` training batches, ``loss_fn(logits, y, x)`` the loss
whose gradient the criterion uses (cross-entropy, or the KD loss against the teacher
for teacher-guided scores). ``g_b`` below is the gradient of that loss on batch ``b``,
``g`` their mean over the ``B`` batches, ``w`` the weight.

===========  ==================================  ======================================
criterion    score                               source
===========  ==================================  ======================================
magnitude    ``|w|``                             Han et al. 2015
taylor       ``|w * g|``                         first-order Taylor, Molchanov et al. 2017
fisher       ``0.5 * mean_b (w * g_b)^2``        empirical Fisher of a weight mask,
                                                 Theis et al. 2018 (per batch, not per
                                                 sample)
snip         ``|w * g| / sum over all |w * g|``  connection sensitivity, Lee et al. 2019
grasp        ``w * (H g)``                       gradient signal preservation, Wang et
                                                 al. 2020 (they drop the largest
                                                 ``-w * Hg``, i.e. keep the largest
                                                 ``w * Hg``); H is the loss Hessian
movement     ``-sum_b w * g_b``                  movement pruning, Sanh et al. 2020
===========  ==================================  ======================================

Scores are computed in fp32 in evaluation mode (BatchNorm running statistics,
fake-quant observers frozen), so scoring never changes the model. SNIP and GraSP were
designed for pruning at initialisation: the prune stage's ``at_init: true`` re-initialises
the weights before scoring; on a trained model they score the trained weights.
Movement is meant to accumulate over fine-tuning (:class:`MovementTracker`, used by the
gradual and iterative schedules); computed from ``batches`` alone it is the movement of
one plain gradient step per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.train import eval_mode

Batches = list[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Scores = dict[str, torch.Tensor]
Params = dict[str, nn.Parameter]

CRITERIA = ("magnitude", "taylor", "fisher", "snip", "grasp", "movement")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The default scoring loss: plain cross-entropy (``x`` unused)."""
    del x
    return F.cross_entropy(logits, y)


class Criterion(Protocol):
    """What every criterion but :func:`magnitude` is: ``score(model, batches, loss_fn,
    names) -> {name: scores}`` (see the module doc)."""

    def __call__(
        self,
        model: nn.Module,
        batches: Batches,
        loss_fn: LossFn = ...,
        names: Iterable[str] | None = None,
    ) -> Scores: ...


def _params(model: nn.Module, names: Iterable[str] | None) -> Params:
    params = dict(model.named_parameters())
    if names is None:
        return {n: p for n, p in params.items() if p.ndim >= 2}
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"the model has no parameters {missing[:3]}")
    return {n: params[n] for n in names}


def _batch_grads(
    model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params
) -> Iterable[dict[str, torch.Tensor]]:
    """Yield ``{name: gradient}`` of ``loss_fn`` for each batch (fp32, eval mode)."""
    if not batches:
        raise ValueError("gradient-based criteria need at least one batch")
    device = next(iter(params.values())).device
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x).float(), y, x)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            yield {
                n: (torch.zeros_like(p) if g is None else g.detach())
                for (n, p), g in zip(params.items(), grads, strict=True)
            }


def _sum_over_batches(
    model: nn.Module,
    batches: Batches,
    loss_fn: LossFn,
    params: Params,
    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Scores:
    """``sum_b term(w, g_b)`` per parameter (fp32): the one accumulation of the
    gradient-based criteria (``g_b`` the loss gradient on batch ``b``)."""
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for grads in _batch_grads(model, batches, loss_fn, params):
        for n, g in grads.items():
            total[n] += term(params[n].detach().float(), g.float())
    return total


def _criterion(body: Callable[[nn.Module, Batches, LossFn, Params], Scores]) -> Criterion:
    """The criterion ``body(model, batches, loss_fn, params)`` with the signature every
    criterion shares, ``(model, batches, loss_fn=cross_entropy, names=None)``: ``names``
    (default: every weight of two or more dimensions) looked up once, here."""

    def criterion(
        model: nn.Module,
        batches: Batches,
        loss_fn: LossFn = cross_entropy,
        names: Iterable[str] | None = None,
    ) -> Scores:
        return body(model, batches, loss_fn, _params(model, names))

    criterion.__name__ = criterion.__qualname__ = body.__name__
    criterion.__doc__ = body.__doc__
    return criterion


@_criterion
def mean_gradient(model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params) -> Scores:
    """Mean over ``batches`` of the loss gradient of each named parameter."""
    total = _sum_over_batches(model, batches, loss_fn, params, lambda w, g: g)
    return {n: t / len(batches) for n, t in total.items()}


def magnitude(
    model: nn.Module,
    batches: Batches | None = None,
    loss_fn: LossFn | None = None,
    names: Iterable[str] | None = None,
) -> Scores:
    """``|w|`` (needs no data)."""
    del batches, loss_fn
    return {n: p.detach().abs().float() for n, p in _params(model, names).items()}


@_criterion
def taylor(model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params) -> Scores:
    """``|w * g|``: first-order estimate of the loss change when ``w`` is set to zero."""
    g = mean_gradient(model, batches, loss_fn, params)
    return {n: (p.detach().float() * g[n]).abs() for n, p in params.items()}


@_criterion
def fisher(model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params) -> Scores:
    """``0.5 * mean_b (w * g_b)^2``: the empirical Fisher of a multiplicative weight mask."""
    total = _sum_over_batches(model, batches, loss_fn, params, lambda w, g: (w * g).pow(2))
    return {n: 0.5 * t / len(batches) for n, t in total.items()}


@_criterion
def snip(model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params) -> Scores:
    """``|w * g|`` normalised to sum to 1 over all scored weights (connection sensitivity)."""
    raw = taylor(model, batches, loss_fn, params)
    total = sum(float(s.sum()) for s in raw.values())
    return {n: s / total if total > 0 else s for n, s in raw.items()}


@_criterion
def grasp(model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params) -> Scores:
    """``w * (H g)``: Hessian-gradient product of the loss, ``g`` the mean gradient.

    ``H g`` is the gradient of ``g . grad L(w)`` (``g`` held constant), averaged over the
    batches like ``g``.
    """
    g = mean_gradient(model, batches, loss_fn, params)
    device = next(iter(params.values())).device
    hg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    plist = list(params.values())
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x).float(), y, x)
            grads = torch.autograd.grad(loss, plist, create_graph=True, allow_unused=True)
            z = sum(
                (gr * g[n]).sum() for n, gr in zip(params, grads, strict=True) if gr is not None
            )
            if not isinstance(z, torch.Tensor) or not z.requires_grad:
                continue  # no parameter reached the loss twice-differentiably
            second = torch.autograd.grad(z, plist, allow_unused=True)
            for n, s in zip(params, second, strict=True):
                if s is not None:
                    hg[n] += s.detach().float()
    return {n: p.detach().float() * hg[n] / len(batches) for n, p in params.items()}


@_criterion
def movement(model: nn.Module, batches: Batches, loss_fn: LossFn, params: Params) -> Scores:
    """``-sum_b w * g_b``: how much one gradient step per batch would move ``w`` away from 0."""
    return _sum_over_batches(model, batches, loss_fn, params, lambda w, g: -(w * g))


SCORERS: dict[str, Callable[..., Scores]] = {
    "magnitude": magnitude,
    "taylor": taylor,
    "fisher": fisher,
    "snip": snip,
    "grasp": grasp,
    "movement": movement,
}


def score(
    criterion: str,
    model: nn.Module,
    batches: Batches | None,
    loss_fn: LossFn = cross_entropy,
    names: Iterable[str] | None = None,
) -> Scores:
    """Scores of ``criterion`` (one of :data:`CRITERIA`) for the named parameters."""
    if criterion not in SCORERS:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if criterion == "magnitude":
        return magnitude(model, names=names)
    return SCORERS[criterion](model, batches or [], loss_fn, names)


class MovementTracker:
    """Accumulates movement scores ``S -= w * grad`` after every optimizer step of training.

    Pass it as the training loop's after-step hook; ``scores`` holds the running sums
    (Sanh et al. 2020's first-order movement scores), keyed by parameter name.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.params = _params(model, names)
        self.scores: Scores = {
            n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()
        }
        self.steps = 0

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        del model
        for n, p in self.params.items():
            if p.grad is not None:
                self.scores[n] -= p.detach().float() * p.grad.float()
        self.steps += 1
