"""Importance criteria against hand computations on tiny linear nets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pqd.prune import importance
from pqd.prune.importance import MovementTracker


def sum_loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L = sum of the logits: dL/dW[o, i] = sum_b x[b, i] for a bias-free linear layer."""
    del y, x
    return logits.sum()


def half_square(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L = 0.5 * sum ||W x||^2 (for the GraSP closed form)."""
    del y, x
    return 0.5 * logits.pow(2).sum()


def linear(weight: list[list[float]]) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


W = [[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]
X1 = torch.tensor([[1.0, 2.0, -1.0]])
X2 = torch.tensor([[0.0, -1.0, 4.0], [2.0, 1.0, 1.0]])
BATCHES = [(X1, torch.zeros(1, dtype=torch.long)), (X2, torch.zeros(2, dtype=torch.long))]


def grad_of(x: torch.Tensor) -> torch.Tensor:
    """dL/dW for sum_loss on one batch: every row is the column sums of x."""
    return x.sum(0).expand(2, 3)


def test_magnitude_is_abs_weight() -> None:
    s = importance.magnitude(linear(W))
    assert torch.equal(s["weight"], torch.tensor(W).abs())


def test_taylor_is_abs_weight_times_mean_gradient() -> None:
    g = (grad_of(X1) + grad_of(X2)) / 2
    s = importance.taylor(linear(W), BATCHES, sum_loss)
    assert torch.allclose(s["weight"], (torch.tensor(W) * g).abs())


def test_fisher_is_half_mean_of_squared_mask_gradients() -> None:
    w = torch.tensor(W)
    expected = 0.5 * ((w * grad_of(X1)) ** 2 + (w * grad_of(X2)) ** 2) / 2
    s = importance.fisher(linear(W), BATCHES, sum_loss)
    assert torch.allclose(s["weight"], expected)


def test_snip_is_normalised_connection_sensitivity() -> None:
    w = torch.tensor(W)
    raw = (w * grad_of(X1)).abs()
    s = importance.snip(linear(W), BATCHES[:1], sum_loss)["weight"]
    assert torch.allclose(s, raw / raw.sum())
    assert s.sum().item() == pytest.approx(1.0)


def test_movement_is_minus_sum_of_weight_times_gradient() -> None:
    w = torch.tensor(W)
    expected = -(w * grad_of(X1) + w * grad_of(X2))
    s = importance.movement(linear(W), BATCHES, sum_loss)
    assert torch.allclose(s["weight"], expected)


def test_grasp_matches_closed_form_on_a_linear_layer() -> None:
    # L = 0.5 * sum_b ||W x_b||^2: g = W C with C = sum_b x_b x_b^T, and H g = g C.
    w = torch.tensor(W)
    c = X2.T @ X2
    expected = w * (w @ c @ c)
    s = importance.grasp(linear(W), BATCHES[1:], half_square)
    assert torch.allclose(s["weight"], expected, rtol=1e-5)


def test_grasp_matches_autograd_hvp_on_a_two_layer_net() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    names = ["0.weight", "2.weight"]
    s = importance.grasp(net, [(x, y)], importance.cross_entropy, names)
    params = dict(net.named_parameters())

    def loss_of(w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, w0, params["0.bias"]))
        return F.cross_entropy(F.linear(h, w2, params["2.bias"]), y)

    w = (params["0.weight"].detach(), params["2.weight"].detach())
    g = torch.autograd.grad(loss_of(*[t.requires_grad_() for t in w]), w)
    _, hg = torch.autograd.functional.hvp(loss_of, w, g)
    for name, wi, hgi in zip(names, w, hg, strict=True):
        assert torch.allclose(s[name], wi * hgi, atol=1e-6)


def test_scores_leave_the_model_and_its_mode_unchanged() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    )
    net(torch.randn(2, 3, 6, 6))
    net.train()
    before = copy.deepcopy(net.state_dict())
    batches = [(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 1]))]
    for criterion in importance.CRITERIA:
        scores = importance.score(criterion, net, batches)
        assert set(scores) == {"0.weight", "4.weight"}
        assert all(scores[n].shape == p.shape for n, p in net.named_parameters() if n in scores)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_movement_tracker_accumulates_minus_weight_times_grad_each_step() -> None:
    net = linear(W)
    tracker = MovementTracker(net, ["weight"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expected = torch.zeros(2, 3)
    for x, y in BATCHES:
        opt.zero_grad()
        sum_loss(net(x), y, x).backward()
        opt.step()
        expected -= net.weight.detach() * net.weight.grad
        tracker(net)
    assert tracker.steps == 2
    assert torch.allclose(tracker.scores["weight"], expected)


def test_unknown_criterion_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown criterion"):
        importance.score("random", linear(W), BATCHES)
