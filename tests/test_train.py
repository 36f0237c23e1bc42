"""The shared loop: schedules, learning, KD loss, divergence, side-effect-free eval."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn

from pqd.average import EMA_WARMUP
from pqd.recipe import TrainSpec
from pqd.step_state import load_epoch, save_epoch
from pqd.train import (
    TrainingDiverged,
    autocast_dtype,
    build_optimizer,
    eval_mode,
    evaluate,
    fit,
    kd_loss,
    lr_factor,
)

CPU = torch.device("cpu")


class Batches:
    """A fixed list of batches (what pqd.data.Loader provides, minus augmentation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int) -> None:
        self.items = [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable classes of 3x4x4 'images'."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 4, 4, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return x, y


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules(schedule: str) -> None:
    cfg = TrainSpec(schedule=schedule, warmup=0.2)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(1 / 20)
    assert f[19] == pytest.approx(1.0)
    assert all(b >= a for a, b in itertools.pairwise(f[:20]))  # warm-up rises
    if schedule == "constant":
        assert f[60] == 1.0
    else:
        assert all(b <= a for a, b in itertools.pairwise(f[20:]))  # then decays
        assert f[-1] < 0.05
    if schedule == "cosine":
        assert f[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 40 / 80)))


def test_no_weight_decay_on_bn_and_bias() -> None:
    net = small_net()
    opt = build_optimizer(net, TrainSpec(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(net[0].weight), id(net[5].weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_fit_learns_and_evaluate_reports_fraction() -> None:
    torch.manual_seed(0)
    x, y = blobs()
    net = small_net()
    cfg = TrainSpec(lr=0.05, batch_size=32, amp="off", channels_last=False)
    before = evaluate(net, Batches(x, y, 64), device=CPU, progress=False)
    res = fit(net, Batches(x, y, 32), cfg, 3, device=CPU, progress=False)
    after = evaluate(net, Batches(x, y, 64), device=CPU, progress=False)
    assert res.steps == 3 * 8 and len(res.losses) == 3
    assert res.losses[-1] < res.losses[0]
    assert 0.0 <= before <= 1.0 and after > 0.95
    assert not net.training


def test_ema_ends_the_fit_with_the_average_of_every_step() -> None:
    torch.manual_seed(0)
    x, y = blobs(64)
    net = small_net()
    seen: list[dict[str, torch.Tensor]] = []
    averaged: list[torch.Tensor] = []
    decay = 0.8
    fit(
        net,
        Batches(x, y, 16),
        TrainSpec(lr=0.1, amp="off", channels_last=False, ema=decay),
        2,
        device=CPU,
        progress=False,
        after_step=lambda m: seen.append({k: v.clone() for k, v in m.state_dict().items()}),
        on_average=lambda m: averaged.append(m[0].weight.detach().clone()),
    )
    steps = seen  # after_step runs after optimizer steps only, not on the average
    assert len(steps) == 8
    expected = {k: v.float().clone() for k, v in steps[0].items()}
    for n, state in enumerate(steps[1:], start=1):
        d = min(decay, (1 + n) / (EMA_WARMUP + n))
        for k, v in state.items():
            expected[k] = v.float() if "num_batches" in k else d * expected[k] + (1 - d) * v
    got = net.state_dict()
    for k in ("0.weight", "5.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
        assert not torch.allclose(got[k], steps[-1][k], atol=1e-4), f"{k} is the last step's"
    assert len(averaged) == 1 and torch.equal(averaged[0], got["0.weight"])


def test_ema_of_a_pruned_model_stays_pruned() -> None:
    x, y = blobs(64)
    net = small_net()
    mask = torch.rand_like(net[0].weight) > 0.5
    step = [0]
    # the mask arrives at step 2 (gradual pruning): the average holds earlier, dense weights

    def prune(m: nn.Module) -> None:
        if step[0] >= 2:
            with torch.no_grad():
                m[0].weight.mul_(mask)

    cfg = TrainSpec(amp="off", channels_last=False, ema=0.9)
    fit(
        net,
        Batches(x, y, 16),
        cfg,
        1,
        device=CPU,
        progress=False,
        on_step=lambda s, t: step.__setitem__(0, s),
        after_step=prune,
        on_average=prune,
    )
    assert bool((net[0].weight[~mask] == 0).all()) and bool((net[0].weight[mask] != 0).all())


def test_ema_resumes_where_it_stopped(tmp_path) -> None:
    x, y = blobs(64)
    cfg = TrainSpec(lr=0.1, amp="off", channels_last=False, ema=0.7)
    torch.manual_seed(1)
    whole = small_net()
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    fit(whole, Batches(x, y, 16), cfg, 3, device=CPU, progress=False)

    class Killed(Exception):
        pass

    path = tmp_path / "epoch.safetensors"
    cut = small_net()
    cut.load_state_dict(start)

    def stop_after_first(progress) -> None:
        progress.seconds = 12.5  # (the run folder's: the step's seconds so far)
        save_epoch(path, "fp", cut, {}, progress, None)
        raise Killed

    torch.manual_seed(1)
    with pytest.raises(Killed):
        fit(cut, Batches(x, y, 16), cfg, 3, device=CPU, progress=False, on_epoch=stop_after_first)
    again = small_net()
    progress = load_epoch(path, "fp", again, {}, None)
    assert progress is not None and progress.ema is not None and progress.epoch == 1
    assert progress.seconds == 12.5
    fit(again, Batches(x, y, 16), cfg, 3, device=CPU, progress=False, resume=progress)
    for k, v in whole.state_dict().items():
        assert torch.allclose(again.state_dict()[k].float(), v.float(), atol=1e-6), k


def test_ema_of_a_graph_averages_its_weights_and_leaves_its_buffers_alone() -> None:
    x, y = blobs(64)
    torch.manual_seed(0)
    graph = torch.export.export(small_net(), (x[:16],)).module()
    seen: list[dict[str, torch.Tensor]] = []
    fit(
        graph,
        Batches(x, y, 16),
        TrainSpec(lr=0.1, amp="off", channels_last=False, ema=0.8),
        1,
        device=CPU,
        progress=False,
        after_step=lambda m: seen.append({k: v.clone() for k, v in m.state_dict().items()}),
    )
    got, last = graph.state_dict(), seen[-1]
    buffers = [k for k in got if "running_" in k]
    weights = [k for k, _ in graph.named_parameters()]
    assert buffers and weights
    for k in buffers:  # the live model's statistics, not an average of them
        assert torch.equal(got[k], last[k]), k
    for k in weights:
        assert not torch.allclose(got[k], last[k], atol=1e-4), f"{k} is the last step's"


def test_hooks_run_every_step() -> None:
    x, y = blobs(64)
    calls: list[str] = []
    fit(
        small_net(),
        Batches(x, y, 16),
        TrainSpec(amp="off", channels_last=False),
        2,
        device=CPU,
        progress=False,
        on_step=lambda s, t: calls.append(f"on{s}/{t}"),
        after_step=lambda m: calls.append("after"),
    )
    assert calls[:2] == ["on0/8", "after"] and len(calls) == 16


def test_divergence_is_reported_as_user_error() -> None:
    x, y = blobs(64)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="fix: lower the learning rate"):
        fit(
            small_net(),
            Batches(x, y, 64),
            TrainSpec(amp="off", channels_last=False),
            1,
            device=CPU,
            progress=False,
        )


def test_kd_loss_is_ce_when_alpha_zero_and_zero_kl_for_identical_logits() -> None:
    torch.manual_seed(0)
    teacher = small_net().eval()
    x, y = blobs(16)
    logits = teacher(x).detach()
    loss = kd_loss(teacher, 4.0, 1.0, 0.0, device=CPU, amp="off")
    assert loss(logits, y, x).item() == pytest.approx(0.0, abs=1e-6)
    ce_only = kd_loss(teacher, 4.0, 0.0, 0.0, device=CPU, amp="off")
    assert ce_only(logits, y, x).item() == pytest.approx(
        nn.functional.cross_entropy(logits, y).item(), rel=1e-6
    )
    other = kd_loss(teacher, 4.0, 1.0, 0.0, device=CPU, amp="off")(torch.zeros_like(logits), y, x)
    assert other.item() > 0


class FakeQuant(nn.Module):
    """Stands in for a torchao fake-quantizer: just the observer flag."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_eval_mode_freezes_observers_and_restores_state() -> None:
    net = nn.Sequential(small_net(), FakeQuant())
    net.train()
    with eval_mode(net):
        assert not net.training
        assert net[1].observer_enabled.item() == 0
    assert net.training and net[1].observer_enabled.item() == 1


def test_autocast_choice() -> None:
    net = small_net()
    assert autocast_dtype("off", net, CPU) is None
    assert autocast_dtype("bf16", net, CPU) == torch.bfloat16
    assert autocast_dtype("fp16", net, CPU) is None
    graph = torch.fx.symbolic_trace(net)
    assert autocast_dtype("bf16", graph, CPU) is None  # QAT graphs train in fp32


def test_grad_norm_advice_names_what_can_change_the_outcome() -> None:
    """At the first step the gradient does not depend on lr or grad_clip: the advice says so
    and names the limit; at a later step lowering lr can help; null turns the check off."""
    x, y = blobs(64)
    cfg = TrainSpec(amp="off", channels_last=False, grad_clip=1.0, max_grad_norm=1e-9)
    with pytest.raises(TrainingDiverged) as exc:
        fit(small_net(), Batches(x, y, 16), cfg, 1, device=CPU, progress=False)
    line = exc.value.line()
    assert "step 1/4" in line and "lower the learning rate" not in line
    assert "does not depend on the learning rate" in line and "max_grad_norm: null" in line

    res = fit(
        small_net(),
        Batches(x, y, 16),
        cfg.model_copy(update={"max_grad_norm": None}),
        1,
        device=CPU,
        progress=False,
    )  # null: no limit
    assert res.steps == 4

    calls = {"n": 0}

    def huge_second_loss(logits: torch.Tensor, yy: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = nn.functional.cross_entropy(logits, yy)
        return loss * 1e9 if calls["n"] == 2 else loss

    later = TrainSpec(amp="off", channels_last=False, max_grad_norm=1e6)
    with pytest.raises(TrainingDiverged, match=r"step 2/4: .*fix: lower the learning rate"):
        fit(
            small_net(),
            Batches(x, y, 16),
            later,
            1,
            device=CPU,
            progress=False,
            loss_fn=huge_second_loss,
        )
