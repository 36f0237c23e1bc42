"""Early exit: threshold calibration (known answers), the multi-exit model, the stage's
training modes, masks and quantizers carried through, and the ONNX confidence output."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from helpers import Job
from pqd.data import Dataset
from pqd.errors import RecipeError
from pqd.exits.export import add_confidence_output
from pqd.exits.heads import calibrate_thresholds, confidence, exit_assignment, exit_outcome
from pqd.models import build_model
from pqd.models.multi_exit import MultiExitNet, build_multi_exit, exit_costs
from pqd.recipe import ExitTarget, recipe_from_dict
from pqd.state import State

# ---------------------------------------------------------------------------- calibration


def test_single_exit_zero_drop_picks_lowest_safe_threshold() -> None:
    # exit 0 is right exactly when its confidence is >= 0.8; the final head is always right
    conf = np.array([[0.95, 0.9, 0.8, 0.7, 0.6, 0.5]])
    correct = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    found = calibrate_thresholds(conf, correct, [10, 100], ExitTarget(max_drop_points=0.0), 100)
    assert found["thresholds"] == [0.8]
    assert found["accuracy"] == 1.0 and found["target_met"]
    assert found["exit_fractions"] == [0.5, 0.5]
    assert found["cost"] == pytest.approx(55.0)


def test_drop_budget_lets_one_wrong_input_exit() -> None:
    conf = np.array([[0.95, 0.9, 0.8, 0.7, 0.6, 0.5]])
    correct = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    # one wrong input of six = 16.7 points; 20 points allow it: threshold drops to 0.7
    found = calibrate_thresholds(conf, correct, [10, 100], ExitTarget(max_drop_points=20.0), 100)
    assert found["thresholds"] == [0.7]
    assert found["accuracy"] == pytest.approx(5 / 6)


def test_macs_budget_maximises_accuracy() -> None:
    conf = np.array([[0.95, 0.9, 0.8, 0.7, 0.6, 0.5]])
    correct = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    # cost with m inputs leaving early: (10 m + 100 (6 - m)) / 6 <= 70 -> m >= 2
    found = calibrate_thresholds(conf, correct, [10, 100], ExitTarget(max_macs_fraction=0.7), 100)
    assert found["target_met"]
    # m = 2 or 3 keep accuracy 5/6 (the exit is right on its top 3); fewer MACs wins: m = 3
    assert found["thresholds"] == [0.8] and found["accuracy"] == pytest.approx(5 / 6)
    impossible = calibrate_thresholds(
        conf, correct, [10, 100], ExitTarget(max_macs_fraction=0.05), 100
    )
    assert not impossible["target_met"] and impossible["exit_fractions"] == [1.0, 0.0]


def test_two_exits_joint_search() -> None:
    # input i: exit 0 right on {0, 1}, exit 1 right on {0, 1, 2, 3}; the final right on all
    conf = np.array([[0.9, 0.9, 0.2, 0.2, 0.2, 0.2], [0.9, 0.9, 0.9, 0.9, 0.3, 0.3]])
    correct = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6], bool)
    found = calibrate_thresholds(conf, correct, [1, 5, 10], ExitTarget(max_drop_points=0.0), 10)
    assert found["thresholds"] == [0.9, 0.9]
    assert found["exit_fractions"] == pytest.approx([2 / 6, 2 / 6, 2 / 6])
    assert exit_assignment(conf, [0.9, 0.9]).tolist() == [0, 0, 1, 1, 2, 2]
    out = exit_outcome(conf, correct, [1, 5, 10], [math.inf, math.inf])
    assert out["exit_fractions"] == [0.0, 0.0, 1.0] and out["cost"] == 10


def test_confidence_kinds() -> None:
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]], np.float32)
    assert confidence(logits, "max_softmax") == pytest.approx([0.25, 1.0], abs=1e-6)
    assert confidence(logits, "entropy") == pytest.approx([0.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("kind", ["max_softmax", "entropy"])
def test_onnx_confidence_output_matches_numpy(kind: str) -> None:
    import onnxruntime as ort

    x = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 5])
    y = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 5])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    add_confidence_output(proto, kind, 5)
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32) * 3
    out, conf = sess.run(None, {"input": logits})
    assert np.array_equal(out, logits)
    assert conf.shape == (7,)
    assert conf == pytest.approx(confidence(logits, kind), abs=1e-5)


# ---------------------------------------------------------------------------- the model


def tiny(name: str = "tiny_cnn") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet"])
def test_segments_equal_the_original_and_keep_names(name: str) -> None:
    model = tiny(name).eval()
    x = torch.rand(4, 3, 32, 32)
    ref = model(x)
    net = build_multi_exit(model, None, 10, x, head_channels=8).eval()
    assert net.positions == list(model.net.default_exit_points)
    assert torch.equal(net(x), ref)
    outs = net.forward_all(x)
    assert len(outs) == net.num_exits + 1 and torch.equal(outs[-1], ref)
    # every parameter of the plain model is found under its segment name, same tensor
    params = dict(net.named_parameters())
    for n, p in model.named_parameters():
        assert params[net.name_of(n)] is p
    # MACs: segments add up to the plain network; costs grow exit by exit
    from pqd.models.multi_exit import count_part_macs

    full = count_part_macs(
        build_multi_exit(copy.deepcopy(model), [len(model.net.features) - 2], 10, x), x[:1]
    )
    assert sum(net.part_macs["segments"]) == sum(full["segments"])
    costs = exit_costs(net.part_macs)
    assert costs == sorted(costs) and costs[-1] == sum(net.part_macs["segments"]) + sum(
        net.part_macs["heads"]
    )


def test_bad_positions_are_user_errors() -> None:
    from pqd.errors import ModelError

    with pytest.raises(ModelError, match="positions"):
        build_multi_exit(tiny(), [2], 10, torch.rand(2, 3, 32, 32))  # after the last block
    with pytest.raises(ModelError, match="exit protocol") as info:
        build_multi_exit(torch.nn.Linear(2, 2), [0], 10, torch.rand(2, 2))
    assert "`features`" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("patch", "fix"),
    [
        ({"stages": [{"stage": "early_exit"}, {"stage": "early_exit"}]}, "keep one"),
        (
            {"stages": [{"stage": "early_exit", "positions": [0, 1], "weights": [1.0]}]},
            "one weight per exit",
        ),
        ({"stages": [{"stage": "early_exit", "target": {}}]}, "exactly one"),
        (
            {
                "stages": [
                    {
                        "stage": "early_exit",
                        "target": {"max_drop_points": 1, "max_macs_fraction": 0.5},
                    }
                ]
            },
            "exactly one",
        ),
        ({"stages": [{"stage": "early_exit", "head": {"kernel_size": 5}}]}, "1 or 3"),
    ],
)
def test_recipe_rejects_bad_early_exit(patch: dict, fix: str) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"name": "tiny_cnn"}, **patch})
    assert fix in str(err.value) and len(str(err.value).splitlines()) == 1


# ---------------------------------------------------------------------------- the stage


def synthetic_data(n_train: int = 96, n_val: int = 32, n_test: int = 32) -> Dataset:
    """Class k: a colour tint k/10 plus noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        x = y.view(-1, 1, 1, 1) * 25 + torch.randint(0, 30, (n, 3, 32, 32), generator=g)
        return x.clamp(0, 255).to(torch.uint8), y

    (tx, ty), (vx, vy), (ex, ey) = split(n_train), split(n_val), split(n_test)
    return Dataset(
        "synthetic",
        10,
        [str(i) for i in range(10)],
        (0.5,) * 3,
        (0.25,) * 3,
        tx,
        ty,
        vx,
        vy,
        ex,
        ey,
        Path("."),
    )


def run_stages(stages: list[dict], model: str = "tiny_cnn") -> tuple[State, Job]:
    recipe = recipe_from_dict(
        {
            "model": {"name": model},
            "train": {"batch_size": 32, "lr": 0.05, "amp": "off"},
            "stages": stages,
        }
    )
    data = synthetic_data()
    torch.manual_seed(0)
    base = build_model(model, 10, data.mean, data.std)
    job = Job(recipe=recipe, data=data, teacher=copy.deepcopy(base).eval())
    return job.run_stages(State(model=base)), job


def test_heads_mode_freezes_the_backbone_and_trains_heads() -> None:
    state0, _ = run_stages([])
    before = {k: v.clone() for k, v in state0.model.state_dict().items()}
    torch.manual_seed(0)
    state, _ = run_stages(
        [
            {
                "stage": "early_exit",
                "epochs": 1,
                "mode": "heads",
                "head": {"channels": 4},
                "distill": "final",
            }
        ]
    )
    net = state.model
    assert isinstance(net, MultiExitNet) and net.num_exits == 2
    after = net.state_dict()
    for k, v in before.items():  # weights and BN statistics of the backbone unchanged
        seg = net.name_of(k)
        assert torch.equal(after[seg], v), seg
    heads0 = build_multi_exit(
        copy.deepcopy(state0.model), None, 10, torch.rand(2, 3, 32, 32), head_channels=4
    )
    assert not torch.equal(heads0.heads[0].layers[-1].weight, net.heads[0].layers[-1].weight)
    assert len(net.thresholds) == 2 and len(state.info["val_exit_accuracy"]) == 3
    assert all(p.requires_grad for p in net.parameters())  # the freeze was undone


def test_joint_mode_trains_the_backbone() -> None:
    state0, _ = run_stages([])
    w0 = state0.model.net.features[0][0].weight.clone()
    state, _ = run_stages(
        [
            {
                "stage": "early_exit",
                "epochs": 1,
                "mode": "joint",
                "weights": [0.5, 1.0],
                "distill": "teacher",
            }
        ]
    )
    params = dict(state.model.named_parameters())
    assert not torch.equal(params["segments.0.net.features.0.0.weight"], w0)


def test_prune_before_exit_masks_are_renamed_and_kept() -> None:
    state, _ = run_stages(
        [
            {"stage": "prune", "sparsity": 0.5, "scope": "layer", "epochs": 0},
            {"stage": "early_exit", "epochs": 1, "mode": "joint"},
        ]
    )
    params = dict(state.model.named_parameters())
    assert state.masks and all(n.startswith("segments.") for n in state.masks)
    for n, m in state.masks.items():
        assert bool((params[n][~m] == 0).all())
        assert (~m).float().mean() == pytest.approx(0.5, abs=0.02)


def test_quantize_before_exit_carries_quantizers_over() -> None:
    state, _ = run_stages(
        [
            {"stage": "quantize", "epochs": 0, "calibration_batches": 2},
            {"stage": "early_exit", "epochs": 0},
        ]
    )
    net = state.model
    assert state.quantized and all(isinstance(p, torch.fx.GraphModule) for _, p in net.parts())
    copied, total = map(int, state.info["quantizers_carried_over"].split("/"))
    # every backbone quantizer has a match; the pool-linear heads' 3 each are new
    assert total - copied == 2 * 3 and copied > 0


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet"])
def test_carried_quantizers_reproduce_the_whole_graph(name: str) -> None:
    from pqd.exits.heads import carry_observers, eager_from_graph
    from pqd.quant.calibration import calibrate
    from pqd.quant.prepare import prepare_qat, prepare_qat_parts
    from pqd.train import eval_mode

    model = tiny(name)
    like = copy.deepcopy(model)
    whole = prepare_qat(model, torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        for _ in range(3):
            whole(torch.rand(16, 3, 32, 32))
    net = build_multi_exit(eager_from_graph(whole, like), None, 10, torch.rand(2, 3, 32, 32))
    prepare_qat_parts(net, torch.rand(2, 3, 32, 32))
    # calibrated on other data: the ranges differ until carried over
    calibrate(net, [(torch.rand(16, 3, 32, 32) * 0.5, None)], 1, torch.device("cpu"))
    copied, total = carry_observers(whole, [p for _, p in net.parts()])
    assert total - copied == 3 * net.num_exits  # only the heads' quantizers are new
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad(), eval_mode(net), eval_mode(whole):
        # segment boundaries quantize twice with the same scale: still the same numbers
        assert torch.allclose(net(x), whole(x), atol=1e-5)


# ---------------------------------------------------------------------------- user models


class ProtocolNet(torch.nn.Module):
    """A user model that is no ZooNet but follows the early-exit protocol."""

    def __init__(self, num_classes: int = 10, width: int = 8, skew: bool = False) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)),
            nn.Sequential(nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width)),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU()),
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)
        )
        self.default_exit_points = [0, 1]
        self.skew = skew

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.features(x))
        return out * 2 if self.skew else out


def protocol_net(num_classes: int = 10, **kwargs) -> torch.nn.Module:
    return ProtocolNet(num_classes, **kwargs)


def test_user_model_following_the_protocol_goes_through_early_exit() -> None:
    from pqd.models import ZooNet

    state, job = run_stages(
        [{"stage": "early_exit", "epochs": 1, "mode": "heads", "head": {"channels": 8}}],
        model=f"{__name__}:protocol_net",
    )
    net = state.model
    assert isinstance(net, MultiExitNet) and not isinstance(job.teacher.net, ZooNet)
    assert net.positions == [0, 1] and net.num_exits == 2
    x = job.data.test_x[:4].float() / 255
    with torch.no_grad():  # heads mode: the backbone is the teacher's, op for op
        torch.testing.assert_close(net.eval()(x), job.teacher(x))
    assert len(state.info["thresholds"]) == 2


def test_bare_protocol_network_is_cut_under_its_own_names() -> None:
    torch.manual_seed(0)
    model = ProtocolNet().eval()  # no Classifier around it (identity normalisation)
    x = torch.rand(4, 3, 32, 32)
    net = build_multi_exit(model, [1], 10, x).eval()
    assert torch.equal(net(x), model(x))
    params = dict(net.named_parameters())
    for n, p in model.named_parameters():
        assert params[net.name_of(n)] is p
    assert net.name_of("features.0.0.weight") == "segments.0.features.0.0.weight"


def test_protocol_violations_name_the_protocol() -> None:
    from pqd.errors import ModelError

    x = torch.rand(2, 3, 32, 32)
    skewed = build_model(f"{__name__}:protocol_net", 10, (0.5,) * 3, (0.25,) * 3, skew=True)
    with pytest.raises(ModelError) as info:  # forward is not classifier(features(x))
        build_multi_exit(skewed, None, 10, x)
    msg = str(info.value)
    assert "classifier(features(x))" in msg and "default_exit_points" in msg and "\n" not in msg
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ModelError, match=r"exit protocol.*no `features`"):
        build_multi_exit(plain, [0], 10, x)
    no_defaults = ProtocolNet()
    del no_defaults.default_exit_points
    with pytest.raises(ModelError, match="no default exit points"):
        build_multi_exit(no_defaults, None, 10, x)
    assert build_multi_exit(no_defaults, [0], 10, x).positions == [0]  # positions: given
