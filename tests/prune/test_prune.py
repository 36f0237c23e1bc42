"""Magnitude pruning: known weights give known masks; schedules; masks are kept."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from pqd.prune.masks import (
    cubic_sparsity,
    iterative_sparsities,
    magnitude_masks,
    masks_from_scores,
    nm_eligible,
    nm_masks,
    prunable_parameters,
    sparsity_of,
)
from pqd.state import MaskKeeper


def known_weights() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([[1.0, -2.0], [3.0, -4.0]]), "b": torch.tensor([[0.5, 5.0]])}


def test_global_magnitude_prunes_smallest_across_layers() -> None:
    masks = magnitude_masks(known_weights(), 0.5, "global")
    # the three smallest |w| overall: 0.5 (b), 1 and -2 (a)
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [[False, True]]


def test_layer_magnitude_prunes_each_tensor_to_the_fraction() -> None:
    masks = magnitude_masks(known_weights(), 0.5, "layer")
    assert masks["a"].tolist() == [[False, False], [True, True]]
    assert masks["b"].tolist() == [[False, True]]
    masks = magnitude_masks(
        {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([40.0, 30.0, 20.0, 10.0])},
        0.25,
        "layer",
    )
    assert masks["a"].tolist() == [True, True, True, False]
    assert masks["b"].tolist() == [True, True, True, False]


def test_global_differs_from_layer_when_scales_differ() -> None:
    w = {"small": torch.tensor([1.0, 2.0, 3.0, 4.0]), "big": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    g = magnitude_masks(w, 0.5, "global")
    assert g["small"].sum() == 0 and g["big"].sum() == 4


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_exact_count_even_with_ties(sparsity: float) -> None:
    w = {"t": torch.ones(10, 10), "u": torch.ones(7, 3)}
    masks = magnitude_masks(w, sparsity, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * 121)
    assert sparsity_of(masks) == pytest.approx(round(sparsity * 121) / 121)


def test_invalid_sparsity_rejected() -> None:
    with pytest.raises(ValueError):
        magnitude_masks(known_weights(), 1.0)


def test_cubic_schedule() -> None:
    assert cubic_sparsity(0, 100, 0.8) == 0.0
    assert cubic_sparsity(100, 100, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(50, 100, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    values = [cubic_sparsity(t, 100, 0.8) for t in range(101)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    # the cubic front-loads pruning: more than linear at every interior point
    assert all(v > 0.8 * t / 100 for t, v in enumerate(values) if 0 < t < 100)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_prunable_parameters_are_conv_and_linear_weights() -> None:
    net = Net()
    assert set(prunable_parameters(net)) == {"conv.weight", "fc.weight"}
    assert set(prunable_parameters(net, ["fc.*"])) == {"conv.weight"}


def test_mask_keeper_holds_zeros_through_sgd_with_momentum_and_decay() -> None:
    torch.manual_seed(0)
    net = Net()
    masks = magnitude_masks(prunable_parameters(net), 0.6)
    keep = MaskKeeper(net, masks)
    keep(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        loss = net(torch.randn(4, 3, 8, 8)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        keep(net)
    for name, p in prunable_parameters(net).items():
        assert torch.all(p[~masks[name]] == 0)
        assert torch.all(p[masks[name]] != 0)


def test_mask_keeper_sees_masks_updated_in_place() -> None:
    net = Net()
    masks = {"fc.weight": torch.ones_like(net.fc.weight, dtype=torch.bool)}
    keep = MaskKeeper(net, masks)
    masks["fc.weight"] = torch.zeros_like(net.fc.weight, dtype=torch.bool)  # a gradual update
    keep(net)
    assert torch.all(net.fc.weight == 0)


def test_mask_keeper_rejects_unknown_names() -> None:
    with pytest.raises(RuntimeError, match="lacks"):
        MaskKeeper(Net(), {"nope.weight": torch.ones(1, dtype=torch.bool)})


# ---------------------------------------------------------------------------- scores, N:M


def test_masks_from_signed_scores_prune_the_lowest_not_the_smallest_magnitude() -> None:
    masks = masks_from_scores({"a": torch.tensor([-5.0, 0.1, 2.0, -0.2])}, 0.5)
    assert masks["a"].tolist() == [False, True, True, False]


def test_nm_masks_keep_the_n_best_of_every_m_along_the_input_axis() -> None:
    w = torch.tensor([[1.0, 4.0, 2.0, 3.0, -8.0, 0.5, 7.0, 0.1]])
    masks = nm_masks({"w": w.abs()}, 2, 4)
    assert masks["w"].tolist() == [[False, True, False, True, True, False, True, False]]
    assert nm_masks({"w": w.abs()}, 2, 4, zeros=1)["w"].sum() == 6


def test_nm_masks_on_conv_group_input_channels_at_each_position() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 8, 2, 2)
    mask = nm_masks({"c": w.abs()}, 1, 4)["c"]
    assert mask.shape == w.shape
    groups = mask.movedim(1, -1).reshape(3, 2, 2, 2, 4)  # [out, kh, kw, group, 4]
    assert torch.all(groups.sum(-1) == 1)
    # the kept one is the largest |w| of its group of 4 input channels
    best = w.abs().movedim(1, -1).reshape(3, 2, 2, 2, 4).argmax(-1)
    assert torch.equal(groups.float().argmax(-1), best)


def test_nm_eligibility() -> None:
    assert nm_eligible(torch.zeros(8, 16, 3, 3), 4)
    assert not nm_eligible(torch.zeros(8, 3, 3, 3), 4)  # the RGB stem
    assert not nm_eligible(torch.zeros(8, 1, 3, 3), 4)  # depthwise
    assert nm_eligible(torch.zeros(10, 64), 4) and not nm_eligible(torch.zeros(10, 6), 4)
    with pytest.raises(ValueError):
        nm_masks({"x": torch.zeros(2, 6)}, 2, 4)


def test_iterative_sequence() -> None:
    seq = iterative_sparsities(0.875, 3)
    assert seq == pytest.approx([0.5, 0.75, 0.875])
    assert iterative_sparsities(0.9, 1) == pytest.approx([0.9])
