"""Model zoo: every registered net builds, fits the structural/INT8 contract, and
build_model / check_output_shape report user errors as one-line ModelErrors."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from pqd.errors import ModelError
from pqd.models import Classifier, Normalize, build_model, check_output_shape, model_names
from pqd.registry import MODELS
from torchvision_helpers import (
    mobilenet_v2_layout,
    mobilenet_v3_small_layout,
    random_state,
    resnet_forward,
    resnet_layout,
)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
EXPECTED = {
    "resnet18",
    "resnet34",
    "resnet20",
    "resnet32",
    "resnet56",
    "wrn",
    "wrn28_10",
    "wrn16_4",
    "vgg16_bn",
    "vgg19_bn",
    "mobilenetv2",
    "fastnet",
    "tiny_cnn",
    "tiny_resnet",
    "resnet18_imagenet",
    "resnet34_imagenet",
    "resnet50_imagenet",
    "mobilenetv2_imagenet",
    "mobilenetv3_small",
    "mobilenetv3_large",
}
HEAVY = {"resnet34", "wrn28_10", "vgg19_bn", "resnet34_imagenet", "resnet50_imagenet"}
# built, and run once at batch 1
SE_NETS = {"mobilenetv3_small", "mobilenetv3_large"}
"""torchvision's MobileNetV3: squeeze-excite convs carry a bias and no BN, and hardswish
is its activation (outside the INT8 rules by design; see pqd.models.mobilenetv3)."""
KWARGS = {"wrn": {"depth": 16, "widen_factor": 2}}  # its defaults are wrn28_10's
SMALL_FASTNET = {"widths": (8, 16), "stem": 8}


def make_user_net(num_classes: int = 10, hidden: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, hidden, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(hidden, num_classes),
    )


def not_a_module(num_classes: int = 10) -> str:
    return "not a module"


def conv_bn_problems(net: nn.Module) -> list[str]:
    """Convs whose output does not go straight (and only) into a BatchNorm2d, traced with fx."""
    gm = torch.fx.symbolic_trace(net)
    mods = dict(gm.named_modules())
    problems = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Conv2d):
            users = list(node.users)
            ok = (
                len(users) == 1
                and users[0].op == "call_module"
                and isinstance(mods[users[0].target], nn.BatchNorm2d)
            )
            if not ok:
                problems.append(f"{node.target} -> {[u.name for u in users]}")
    return problems


def int8_rule_problems(name: str, net: nn.Module) -> list[str]:
    problems = []
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if isinstance(m.padding, str):
                problems.append(f"{mod_name}: padding={m.padding!r}")
            if m.bias is not None and not (name in SE_NETS and ".fc" in mod_name):
                problems.append(f"{mod_name}: conv bias before BN")
        if isinstance(m, (nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU)) and name not in SE_NETS:
            problems.append(f"{mod_name}: {type(m).__name__}")
        if isinstance(m, nn.ReLU6) and not name.startswith("mobilenetv2"):
            problems.append(f"{mod_name}: ReLU6 outside MobileNetV2")
        if isinstance(m, nn.ReLU) and m.inplace:
            problems.append(f"{mod_name}: inplace ReLU")
    return problems


def test_registry_has_the_zoo() -> None:
    assert set(model_names()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, MEAN, STD, **KWARGS.get(name, {}))
    net = model.net
    assert isinstance(net.features, nn.Sequential) and len(net.features) >= 2
    assert isinstance(net.classifier, nn.Module)
    linears = [m for m in net.classifier.modules() if isinstance(m, nn.Linear)]
    assert linears and linears[-1].out_features == 10
    exits = net.default_exit_points
    assert isinstance(exits, list) and exits == sorted(set(exits))
    assert all(isinstance(i, int) and 0 <= i < len(net.features) - 1 for i in exits)
    assert len(exits) >= 1
    se_convs = [p for p in conv_bn_problems(net) if ".fc1 " in p or ".fc2 " in p]
    assert conv_bn_problems(net) == (se_convs if name in SE_NETS else [])
    assert int8_rule_problems(name, net) == []
    # forward == classifier(features(x)), and the wrapper normalizes
    x = torch.rand(1 if name in HEAVY else 2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
        manual = net.classifier(net.features((x - model.norm.mean) / model.norm.std))
    assert out.shape == (x.shape[0], 10)
    torch.testing.assert_close(out, manual)


@pytest.mark.parametrize("name", sorted(EXPECTED - HEAVY))
def test_builds_and_fits_100_classes(name: str) -> None:
    model = build_model(name, 100, MEAN, STD, **KWARGS.get(name, {}))
    model.train()
    check_output_shape(model, 100)
    assert model.training and model.net.features[0].training


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_builds_for_100_classes(name: str) -> None:
    net = MODELS[name](num_classes=100)
    assert [m for m in net.classifier.modules() if isinstance(m, nn.Linear)][-1].out_features == 100


def test_param_counts() -> None:
    def count(name: str) -> int:
        return sum(p.numel() for p in MODELS[name](num_classes=10).parameters())

    assert abs(count("resnet18") - 11_173_962) <= 0.01 * 11_173_962
    assert abs(count("resnet20") - 272_000) <= 0.01 * 272_000
    assert count("tiny_cnn") < 10_000 and count("tiny_resnet") < 10_000


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("wrn", {"depth": 10, "widen_factor": 1}),
        ("wrn", {"depth": 16, "widen_factor": 1, "dropout": 0.3}),
        ("mobilenetv2", {"width_mult": 0.25}),
        ("fastnet", {**SMALL_FASTNET, "extra_conv": True}),
        ("resnet20", {"dropout": 0.1}),
    ],
)
def test_kwargs_variants(name: str, kwargs: dict) -> None:
    model = build_model(name, 10, MEAN, STD, **kwargs)
    check_output_shape(model, 10)
    assert conv_bn_problems(model.net) == []


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_resnet"])
def test_tiny_nets_train_step(name: str) -> None:
    model = build_model(name, 10, MEAN, STD).train()
    loss = F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_conv_bn_check_catches_a_pool_between_conv_and_bn() -> None:
    class PoolModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool, self.bn = (
                nn.Conv2d(3, 4, 3, padding=1),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(4),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.pool(self.conv(x)))

    class PoolFunctional(PoolModule):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.max_pool2d(self.conv(x), 2))

    assert conv_bn_problems(PoolModule()) and conv_bn_problems(PoolFunctional())
    assert conv_bn_problems(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


# ~3 s each (torch.export); fastnet with extra_conv has every layer kind of the plain one
@pytest.mark.parametrize(
    "name,kwargs",
    [("tiny_cnn", {}), ("tiny_resnet", {}), ("fastnet", {**SMALL_FASTNET, "extra_conv": True})],
)
def test_qat_prepare_quantizes_every_weight(name: str, kwargs: dict) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    torch.manual_seed(0)
    model = Classifier(MODELS[name](num_classes=10, **kwargs), MEAN, STD).train()
    batch = torch.export.Dim("batch", min=1, max=1024)
    captured = torch.export.export(
        model, (torch.rand(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}}, strict=True
    ).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(captured, quantizer)

    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    weight_ops = [
        n
        for n in prepared.graph.nodes
        if n.op == "call_function"
        and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    ]
    assert len(weight_ops) == n_convs + 1
    for node in weight_ops:
        w = node.args[1]
        assert isinstance(w, torch.fx.Node) and w.op == "call_module", node.name
        assert "FakeQuantize" in type(prepared.get_submodule(str(w.target))).__name__, node.name
    assert prepared(torch.rand(3, 3, 32, 32)).shape == (3, 10)  # batch stays dynamic


def _one_line_model_error(*args, **kwargs) -> str:
    with pytest.raises(ModelError) as info:
        build_model(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_build_model_errors_are_one_line() -> None:
    assert "no_such_net" in _one_line_model_error("no_such_net", 10, MEAN, STD)
    assert "nonexistent_mod" in _one_line_model_error("nonexistent_mod:fn", 10, MEAN, STD)
    assert "bogus" in _one_line_model_error("resnet20", 10, MEAN, STD, bogus=1)
    assert "bogus" in _one_line_model_error("tiny_cnn", 10, MEAN, STD, bogus=1)
    assert "depth" in _one_line_model_error("wrn", 10, MEAN, STD, depth=27)
    assert "nn.Module" in _one_line_model_error(f"{__name__}:not_a_module", 10, MEAN, STD)
    assert "mean" in _one_line_model_error("tiny_cnn", 10, (0.5, 0.5), STD)


def test_user_model_by_module_path() -> None:
    model = build_model(f"{__name__}:make_user_net", 7, MEAN, STD, hidden=6)
    assert isinstance(model, Classifier) and isinstance(model.norm, Normalize)
    assert model.norm.mean.shape == (1, 3, 1, 1)
    check_output_shape(model, 7)
    assert "width" in _one_line_model_error(f"{__name__}:make_user_net", 7, MEAN, STD, width=3)


def test_check_output_shape_rejects_wrong_outputs_and_keeps_modes() -> None:
    model = build_model(f"{__name__}:make_user_net", 5, MEAN, STD).train()
    model.net[0].eval()  # a mixed train/eval state must survive the check
    with pytest.raises(ModelError) as info:
        check_output_shape(model, 10)
    msg = str(info.value)
    assert "\n" not in msg and "[2, 5]" in msg and "[2, 10]" in msg
    assert model.training and not model.net[0].training and model.net[4].training
    with pytest.raises(ModelError):  # too small for five 2x2 max-pools
        check_output_shape(build_model("vgg16_bn", 10, MEAN, STD), 10, image_size=16)


# ---------------------------------------------------------------- ImageNet-style, torchvision names

TORCHVISION = {
    # zoo name: (torchvision layout, torchvision's parameter count for 1000 classes)
    "resnet18_imagenet": (lambda: resnet_layout((2, 2, 2, 2), False), 11_689_512),
    "resnet34_imagenet": (lambda: resnet_layout((3, 4, 6, 3), False), 21_797_672),
    "resnet50_imagenet": (lambda: resnet_layout((3, 4, 6, 3), True), 25_557_032),
    "mobilenetv2_imagenet": (mobilenet_v2_layout, 3_504_872),
    "mobilenetv3_small": (mobilenet_v3_small_layout, 2_542_856),
}


def own_names(net: nn.Module, keys: list[str]) -> list[str]:
    """The zoo names of torchvision keys (ZooNet.own_key_of, identity where it knows none)."""
    return [net.own_key_of(k) or k for k in keys]


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_state_dict_loads_as_is(name: str) -> None:
    layout_fn, n_params = TORCHVISION[name]
    layout = layout_fn()
    net = MODELS[name](num_classes=1000)
    own = net.state_dict()
    # the same tensors: every torchvision key names one own entry of the same shape
    assert sorted(own_names(net, list(layout))) == sorted(own)
    for tv_key, own_key in zip(layout, own_names(net, list(layout)), strict=True):
        assert tuple(own[own_key].shape) == layout[tv_key], tv_key
    assert sum(p.numel() for p in net.parameters()) == n_params
    if not name.startswith("resnet"):  # MobileNets: torchvision's names are the own names
        assert list(own) == list(layout)
    state = random_state(layout)
    result = net.load_state_dict(state)  # strict, as a torchvision user would call it
    assert not result.missing_keys and not result.unexpected_keys
    after = net.state_dict()
    for tv_key, own_key in zip(layout, own_names(net, list(layout)), strict=True):
        assert torch.equal(after[own_key], state[tv_key]), tv_key
    assert set(state) == set(layout)  # the caller's dict is not changed


@pytest.mark.parametrize(
    "name,bottleneck", [("resnet18_imagenet", False), ("resnet50_imagenet", True)]
)
def test_imagenet_resnet_computes_torchvisions_function(name: str, bottleneck: bool) -> None:
    layout = TORCHVISION[name][0]()
    state = random_state(layout, seed=1)
    net = MODELS[name](num_classes=1000)
    net.load_state_dict(state)
    x = torch.rand(2, 3, 32 if bottleneck else 64, 32 if bottleneck else 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), resnet_forward(state, x, bottleneck))


def test_torchvision_checkpoint_file_loads_through_pqd(tmp_path) -> None:
    from pqd.checkpoint import load_checkpoint
    from pqd.errors import CheckpointError

    state = random_state(TORCHVISION["resnet18_imagenet"][0]())
    path = tmp_path / "resnet18.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = build_model("resnet18_imagenet", 1000, MEAN, STD)
    load_checkpoint(model, path)
    got = model.state_dict()
    assert torch.equal(got["net.features.0.0.weight"], state["conv1.weight"])
    assert torch.equal(
        got["net.features.3.downsample.0.weight"], state["layer2.0.downsample.0.weight"]
    )
    assert torch.equal(got["net.classifier.2.bias"], state["fc.bias"])
    assert torch.equal(got["norm.mean"], torch.tensor(MEAN).view(1, 3, 1, 1))
    # a checkpoint for 1000 classes into a 10-class model: one line naming the layer
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model("resnet18_imagenet", 10, MEAN, STD), path)
    msg = str(info.value)
    assert "\n" not in msg and "classifier.2.weight" in msg and "1000x512" in msg


def test_imagenet_nets_at_real_resolutions() -> None:
    net = MODELS["resnet18_imagenet"](num_classes=10, width=8).eval()
    with torch.no_grad():
        for size, final in ((64, 2), (224, 7)):
            x = torch.rand(1, 3, size, size)
            assert net.features(x).shape[-1] == final  # 32x reduction, as torchvision's
            assert net(x).shape == (1, 10)
    check_output_shape(build_model("mobilenetv2_imagenet", 10, MEAN, STD, width_mult=0.25), 10, 64)
    with pytest.raises(ModelError):
        build_model("resnet18_imagenet", 10, MEAN, STD, width=0)


def upsampled_subset(root, size: int = 64, n_train: int = 64):
    """Real CIFAR-10 subset images resized to ``size`` x ``size`` (bilinear), as pqd data."""
    import pqd
    from pqd.data import load_dataset

    ds = load_dataset(
        "cifar10", root, val_size=32, limit_train=n_train, limit_test=32, download=False
    )

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float() / 255, size=size, mode="bilinear", align_corners=False)

    return pqd.data.from_tensors(
        train=(up(ds.train_x), ds.train_y),
        val=(up(ds.val_x), ds.val_y),
        test=(up(ds.test_x), ds.test_y),
        mean=ds.mean,
        std=ds.std,
        num_classes=10,
    )


IMAGENET_SMALL = {  # tiny widths: the layouts and block kinds of the real nets
    "resnet18_imagenet": {"width": 8},
    "resnet50_imagenet": {"width": 8},
    "mobilenetv2_imagenet": {"width_mult": 0.25},
    "mobilenetv3_small": {"width_mult": 0.25},
}


FULL_CHAIN = {"resnet18_imagenet", "mobilenetv3_small"}
"""Nets that run every stage; the others (same block kinds: bottleneck, inverted residual)
run the structure-sensitive ones (prune_channels, quantize, early_exit), to keep time."""


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(IMAGENET_SMALL))
def test_stages_run_on_imagenet_nets_at_64x64(name: str, subset_dir) -> None:
    """prune -> prune_channels -> quantize -> distill (feature KD) -> early_exit at 64x64."""
    import pqd
    from pqd.models.multi_exit import MultiExitNet

    data = upsampled_subset(subset_dir)
    torch.manual_seed(0)
    model = build_model(name, 10, data.mean, data.std, **IMAGENET_SMALL[name])
    full = name in FULL_CHAIN
    stages = [
        *([pqd.Prune(sparsity=0.5, epochs=1)] if full else []),
        pqd.PruneChannels(ratio=0.25, epochs=1 if full else 0),
        # untrained nets: their BN statistics mean nothing yet, so they stay live through QAT
        # (freezing them is the standard recipe's second phase for a trained model)
        pqd.Quantize(epochs=1 if full else 0, calibration_batches=1, freeze_after=None),
        *([pqd.Distill(epochs=1, features={})] if full else []),
        pqd.EarlyExit(epochs=1, mode="heads"),
    ]
    infos: dict[str, dict] = {}

    def keep(i: int, spec, state, seconds: float) -> None:
        infos[type(spec).__name__] = dict(state.info)

    state = pqd.apply_stages(
        model, stages, data, train={"batch_size": 32, "lr": 0.01}, on_stage=keep
    )
    net = state.model
    assert isinstance(net, MultiExitNet) and state.quantized and state.structure
    assert net.positions == model.net.default_exit_points
    if full:
        assert infos["DistillSpec"]["feature_kd"]["points"] == [
            f"net.features.{i}"
            for i in [*model.net.default_exit_points, len(model.net.features) - 1]
        ]
        assert state.masks  # unstructured masks carried through surgery and exits
    with torch.no_grad():  # the 64x64 images run through every exit to 10 logits
        outs = net.eval().forward_all(data.test_x[:2].float() / 255)
    assert [tuple(o.shape) for o in outs] == [(2, 10)] * (net.num_exits + 1)
