"""Recipe: shipped recipes validate and round-trip; bad input gives one clear line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pqd.errors import RecipeError
from pqd.recipe import (
    PruneSpec,
    Recipe,
    TrainOverride,
    TrainSpec,
    dump_recipe,
    load_recipe,
    merge_train,
    recipe_from_dict,
)

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
BASE = {
    "model": {"name": "tiny_cnn"},
    "stages": [
        {"stage": "prune", "sparsity": 0.5},
        {"stage": "quantize"},
        {"stage": "distill"},
    ],
}


def test_there_are_shipped_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    assert dump_recipe(again) == dump_recipe(recipe)


def test_any_order_subset_and_repeats_are_accepted() -> None:
    data = copy.deepcopy(BASE)
    data["stages"] = [
        {"stage": "distill"},
        {"stage": "prune", "sparsity": 0.3},
        {"stage": "prune", "sparsity": 0.6},
        {"stage": "quantize", "mode": "ptq", "epochs": 0},
    ]
    r = recipe_from_dict(data)
    assert r.order() == "distill -> prune -> prune -> quantize"
    assert isinstance(r.stages[1], PruneSpec)
    assert recipe_from_dict({**BASE, "stages": []}).order() == "(no stages)"


BAD = [
    ({"stages": [{"stage": "prune", "sparsity": 1.5}]}, "stages.0.sparsity", "< 1"),
    (
        {"stages": [{"stage": "prune", "sparsity": 0.5, "sparsty": 3}]},
        "stages.0.sparsty",
        "allowed: ",
    ),
    ({"stages": [{"stage": "prun", "sparsity": 0.5}]}, "unknown stage 'prun'", "prune"),
    ({"stages": [{"sparsity": 0.5}]}, "stages.0", "stage: <name>"),
    ({"baseline": {"epochs": -1}}, "baseline.epochs", ">= 0"),
    ({"baseline": {"epochs": 0}}, "baseline", "checkpoint"),
    ({"modle": {"name": "x"}}, "modle", "allowed: name, seed"),
    ({"train": {"lr": "fast"}}, "train.lr", "right type"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "cifar10"),
    ({"measure": {"batch_sizes": [8, 1]}}, "measure", "list 1 first"),
    ({"stages": [{"stage": "quantize", "mode": "ptq", "epochs": 3}]}, "stages.0", "epochs: 0"),
    (
        {"stages": [{"stage": "prune", "sparsity": 0.5, "schedule": "gradual", "epochs": 0}]},
        "stages.0",
        "oneshot",
    ),
    ({"stages": "prune"}, "stages", "right type"),
    ({"measure": {"runtimes": ["tensorrt"]}}, "measure.runtimes.0", "onnxruntime"),
]


@pytest.mark.parametrize(("patch", "where", "fix"), BAD, ids=[b[1] for b in BAD])
def test_bad_values_give_one_line_naming_key_and_fix(patch: dict, where: str, fix: str) -> None:
    data = copy.deepcopy(BASE)
    data.update(patch)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, "r.yaml")
    line = info.value.line()
    assert "\n" not in line
    assert line.startswith("r.yaml: ")
    assert where in line
    assert "fix: " in line and fix in line.split("fix: ", 1)[1]


def test_model_is_required() -> None:
    with pytest.raises(RecipeError, match="model: Field required; fix: add it"):
        recipe_from_dict({"stages": []})


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+"):
        load_recipe(p)


def test_non_mapping_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_set_nested_keys_and_list_items(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    r = load_recipe(
        p,
        [
            "stages.0.sparsity=0.7",
            "baseline.epochs=5",
            "train.lr=0.05",
            "model.kwargs.widths=[8, 16]",
            "measure.runtimes=[onnxruntime]",
        ],
    )
    assert r.stages[0].sparsity == 0.7
    assert r.baseline.epochs == 5
    assert r.train.lr == 0.05
    assert r.model.kwargs == {"widths": [8, 16]}
    with pytest.raises(RecipeError, match="no list item '7'"):
        load_recipe(p, ["stages.7.sparsity=0.1"])
    with pytest.raises(RecipeError, match=r"key\.path=value"):
        load_recipe(p, ["stages.0.sparsity"])
    with pytest.raises(RecipeError, match=r"stages\.0\.sparsity"):
        load_recipe(p, ["stages.0.sparsity=2"])


def test_stage_overrides_merge_into_train_defaults() -> None:
    base = TrainSpec(lr=0.2, batch_size=64)
    merged = merge_train(base, TrainOverride(lr=0.01))
    assert (merged.lr, merged.batch_size) == (0.01, 64)
    data = copy.deepcopy(BASE)
    data["train"] = {"lr": 0.3}
    data["stages"][1]["train"] = {"lr": 0.001, "schedule": "constant"}
    r = recipe_from_dict(data)
    assert r.stage_train(0).lr == 0.3
    assert (r.stage_train(1).lr, r.stage_train(1).schedule) == (0.001, "constant")


def test_train_override_has_every_train_field() -> None:
    assert set(TrainOverride.model_fields) == set(TrainSpec.model_fields)


def test_recipe_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, pqd.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_recipe_round_trips_through_yaml_unchanged() -> None:
    """A recipe is plain data: dumped to YAML and loaded back it is the same recipe, every
    stage the same spec class with the same values (a field that did not survive the trip,
    e.g. a non-JSON value or a stage losing its tag, fails here)."""
    from pqd.recipe import STAGE_NAMES, STAGE_SPECS, dump_recipe

    data = {
        **BASE,
        "stages": [
            {"stage": "prune", "sparsity": 0.7, "schedule": "gradual", "train": {"lr": 0.01}},
            {"stage": "prune_channels", "ratio": 0.25},
            {
                "stage": "quantize",
                "mode": "ptq",
                "epochs": 0,
                "activations": {"observer": "percentile"},
                "mixed_precision": {"max_drop_points": 1},
            },
            {"stage": "early_exit", "weights": [0.5, 2.0], "positions": [1, 2]},
            {"stage": "distill", "features": {"loss": "fitnet"}, "train": {"grad_clip": None}},
        ],
    }
    r = Recipe.model_validate(data)
    back = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert back == r and back.model_dump(mode="json") == r.model_dump(mode="json")
    spec_of = dict(zip(STAGE_NAMES, STAGE_SPECS, strict=True))
    assert [type(s) for s in back.stages] == [spec_of[s["stage"]] for s in data["stages"]]
    assert back.stages[4].train.model_fields_set == {"grad_clip"}  # written null kept
    assert back.stages[0].train.lr == 0.01 and back.stages[1].train.lr is None


def test_relative_paths_in_a_recipe_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    p = folder / "r.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny_cnn"},
                "data": {"root": "../data/cifar"},
                "baseline": {"checkpoint": "ckpt/base.pt"},
            }
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(p)
    assert r.data.root == str(tmp_path / "project" / "data" / "cifar")
    assert r.baseline.checkpoint == str(folder / "ckpt" / "base.pt")
    # the same recipe by a relative path: the same result
    assert load_recipe(Path("..") / "project" / "recipes" / "r.yaml") == r
    # on the command line a relative path is relative to the shell's folder
    r2 = load_recipe(p, ["data.root=mine", "baseline.checkpoint=/abs/b.safetensors"])
    assert r2.data.root == str(elsewhere / "mine")
    assert r2.baseline.checkpoint == "/abs/b.safetensors"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_recipe(p, ["data.root=~/d"]).data.root == str(tmp_path / "d")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_find_the_data_from_any_folder(
    path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    checkout = Path(__file__).resolve().parents[2]
    # the full-scale recipes read the whole CIFAR-10 as image folders, the rest the subset
    folder = "cifar-10-jpg" if load_recipe(path).data.dataset == "folder" else "cifar-10-subset"
    assert load_recipe(path).data.root == str(checkout.parent / "shared" / "data" / folder)


def test_null_turns_grad_checks_off_at_every_level() -> None:
    """``max_grad_norm: null`` / ``grad_clip: null`` / ``ema: null`` mean off in ``train`` and
    in a stage's or the baseline's override (an unwritten field inherits), also after a dump
    and reload."""
    recipe = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "train": {"grad_clip": 5.0, "ema": 0.99},
            "baseline": {"train": {"max_grad_norm": None}},
            "stages": [
                {
                    "stage": "quantize",
                    "train": {"max_grad_norm": None, "grad_clip": None, "lr": None, "ema": None},
                },
                {"stage": "distill", "train": {"lr": 0.01}},
            ],
        }
    )
    for r in (
        recipe,
        recipe_from_dict(recipe.model_dump(mode="json")),
        recipe_from_dict(yaml.safe_load(dump_recipe(recipe))),
    ):
        q, d, b = r.stage_train(0), r.stage_train(1), r.baseline_train()
        assert (q.max_grad_norm, q.grad_clip, q.lr) == (None, None, r.train.lr)
        assert (d.max_grad_norm, d.grad_clip, d.lr) == (1000.0, 5.0, 0.01)
        assert (b.max_grad_norm, b.grad_clip) == (None, 5.0)
        assert (q.ema, d.ema, b.ema) == (None, 0.99, 0.99)  # the weight average: off in q
    top = recipe_from_dict(
        {
            "model": {"name": "tiny_cnn"},
            "train": {"max_grad_norm": None},
            "stages": [{"stage": "distill"}],
        }
    )
    assert top.stage_train(0).max_grad_norm is None


def test_stable_dump_leaves_defaults_out_and_keeps_stage_names_and_order() -> None:
    """Resume fingerprints and search keys hash it: a field pqd adds later with a default
    must not make finished runs look different, while what changes results still does."""
    from pqd.fingerprint import fingerprints
    from pqd.recipe import stable_dump

    base = {
        "name": "r",
        "model": {"name": "tiny_cnn"},
        "data": {"dataset": "cifar10"},
        "stages": [{"stage": "quantize"}, {"stage": "distill"}],
    }
    r = recipe_from_dict(base)
    dump = stable_dump(r)
    assert dump["stages"] == [{"stage": "quantize"}, {"stage": "distill"}]
    assert "train" not in dump  # all at defaults
    explicit = recipe_from_dict({**base, "train": {"lr": 0.1}})  # 0.1 is the default
    assert fingerprints(explicit) == fingerprints(r)
    swapped = recipe_from_dict({**base, "stages": base["stages"][::-1]})
    assert fingerprints(swapped)[1:] != fingerprints(r)[1:]
    assert fingerprints(swapped)[0] == fingerprints(r)[0]  # the same baseline
    changed = recipe_from_dict({**base, "train": {"lr": 0.05}})
    assert fingerprints(changed)[0] != fingerprints(r)[0]
