"""The latency model of pqd plan: widths without surgery, monotone predictions, a cache keyed
by machine and runtime, and one real (small, few-repeat) measurement."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import fake_latency, tiny
from pqd.latency_model.model import MIXED, LatencyModel, validation_text
from pqd.latency_model.tables import bilinear, fit_overhead, monotone

EXAMPLE = torch.rand(2, 3, 32, 32)


def test_widths_match_real_surgery() -> None:
    lm = LatencyModel(tiny("tiny_resnet"), EXAMPLE, round_to=2, cache_dir="unused")
    rng = np.random.default_rng(0)
    for _ in range(4):
        ratios = lm.random_candidate(rng)
        model = lm.candidate_model(ratios)
        modules = dict(model.named_modules())
        for name, (cin, cout) in lm.widths(ratios).items():
            m = modules[name]
            shape = (
                (m.in_channels, m.out_channels)
                if isinstance(m, nn.Conv2d)
                else (m.in_features, m.out_features)
            )
            assert shape == (cin, cout), name


def test_prediction_never_falls_when_a_width_grows_even_with_noisy_pieces(
    monkeypatch, tmp_path
) -> None:
    fake_latency(monkeypatch, noise=0.5)  # pieces 50% noisy: the raw table is not monotone
    lm = LatencyModel(
        tiny("tiny_resnet"), EXAMPLE, levels=(0.25, 0.5, 0.75, 1.0), round_to=2, cache_dir=tmp_path
    ).build()
    groups = list(lm.groups)
    grid = [0.0, 0.25, 0.5, 0.75]
    rng = np.random.default_rng(1)
    for _ in range(30):
        wide = {g: float(rng.choice(grid)) for g in groups}
        narrow = {g: max(r, float(rng.choice(grid))) for g, r in wide.items()}  # no group wider
        assert lm.predict(narrow) <= lm.predict(wide) + 1e-12
    # uniform widths in order: non-decreasing, and the size too
    preds = [lm.predict(lm.uniform(k)) for k in (0.25, 0.5, 0.75, 1.0)]
    assert preds == sorted(preds)
    sizes = [lm.predict_size_mb(lm.uniform(k)) for k in (0.25, 0.5, 0.75, 1.0)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_cache_is_keyed_by_machine_and_runtime_version(monkeypatch, tmp_path) -> None:
    import pqd.measurement.env as env
    import pqd.measurement.runtime as rt

    calls = fake_latency(monkeypatch)
    net = tiny("tiny_cnn")
    first = LatencyModel(net, EXAMPLE, levels=(0.5, 1.0), cache_dir=tmp_path).build()
    n_pieces = calls["pieces"]
    # the overhead fit: both uniform networks and MIXED ones of random widths
    assert n_pieces == len(first.needed_pieces()) > 0 and calls["networks"] == 2 + MIXED
    names = [c["name"] for c in first.calibration]
    assert names == ["uniform-0.5", "uniform-1", *(f"mixed-{i}" for i in range(MIXED))]
    # same machine, same runtime: nothing measured again, same predictions
    again = LatencyModel(net, EXAMPLE, levels=(0.5, 1.0), cache_dir=tmp_path).build()
    assert calls["pieces"] == n_pieces and calls["networks"] == 2 + MIXED
    assert again.measured_pieces == 0
    assert again.predict(again.uniform(0.5)) == pytest.approx(first.predict(first.uniform(0.5)))
    # a fit with another number of mixed networks (one cached before they existed has none)
    # is fitted again; the pieces stay
    fewer = LatencyModel(net, EXAMPLE, levels=(0.5, 1.0), cache_dir=tmp_path, mixed=0).build()
    assert calls["pieces"] == n_pieces and calls["networks"] == 2 * 2 + MIXED
    assert [c["name"] for c in fewer.calibration] == ["uniform-0.5", "uniform-1"]

    # another runtime version: another file, everything measured again
    real_versions = rt.runtime_versions
    monkeypatch.setattr(
        rt, "runtime_versions", lambda: {**real_versions(), "onnxruntime": "0.0.1-other"}
    )
    other = LatencyModel(net, EXAMPLE, levels=(0.5, 1.0), cache_dir=tmp_path)
    assert other.cache_file != first.cache_file
    other.build()
    assert calls["pieces"] == 2 * n_pieces
    monkeypatch.setattr(rt, "runtime_versions", real_versions)

    # another CPU (flags): another file; the other CPU differs from this one in VNNI
    flags = env.cpu_flags()
    other_flags = (
        [f for f in flags if f != "avx512_vnni"]
        if "avx512_vnni" in flags
        else [
            *flags,
            "avx512_vnni",
        ]
    )
    monkeypatch.setattr(env, "cpu_flags", lambda: other_flags)
    cpu = LatencyModel(net, EXAMPLE, levels=(0.5, 1.0), cache_dir=tmp_path)
    assert cpu.cache_file not in (first.cache_file, other.cache_file)
    monkeypatch.undo()

    # a file under this name whose fingerprint differs is not trusted
    fake_latency(monkeypatch)
    text = first.cache_file.read_text()
    first.cache_file.write_text(text.replace('"threads": 2', '"threads": 64'))
    rebuilt = LatencyModel(net, EXAMPLE, levels=(0.5, 1.0), cache_dir=tmp_path).build()
    assert rebuilt.measured_pieces == n_pieces


def test_fastest_and_dense_are_the_grid_ends(monkeypatch, tmp_path) -> None:
    fake_latency(monkeypatch)
    lm = LatencyModel(tiny("tiny_resnet"), EXAMPLE, round_to=2, cache_dir=tmp_path).build()
    dense, fastest = lm.predict({}), lm.predict(lm.uniform(lm.levels[0]))
    assert fastest < dense
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = lm.predict(lm.random_candidate(rng))
        assert fastest - 1e-12 <= p <= dense + 1e-12
    with pytest.raises(Exception, match="does not have"):
        lm.predict({"net.nope": 0.5})


def test_validate_takes_the_median_over_panels_and_counts_their_agreement(
    monkeypatch, tmp_path
) -> None:
    fake_latency(monkeypatch)
    lm = LatencyModel(tiny("tiny_resnet"), EXAMPLE, round_to=2, cache_dir=tmp_path).build()
    exact = LatencyModel.measure_panels  # (the fake: MACs-based, the same in every panel)
    scales = [1.0, 1.05, 1.5]  # panel 2 agrees with panel 1 within 10%, panel 3 does not

    def drifting(self, candidates, panels):
        base = exact(self, candidates, 1)[0]
        return [{n: ms * scales[p] for n, ms in base.items()} for p in range(panels)]

    monkeypatch.setattr(LatencyModel, "measure_panels", drifting)
    one = lm.validate(n=4, panels=1)
    assert "panel_agreement" not in one and "panels_ms" not in one["candidates"][0]
    three = lm.validate(n=4, panels=3)
    assert three["panels"] == 3 and three["panel_agreement"] == 1.0
    for a, b in zip(one["candidates"], three["candidates"], strict=True):
        assert b["measured_ms"] == pytest.approx(a["measured_ms"] * 1.05, abs=2e-5)
        assert b["panels_ms"] == pytest.approx([a["measured_ms"] * s for s in scales], abs=2e-5)
    scales[1] = 1.2
    assert lm.validate(n=4, panels=2)["panel_agreement"] == 0.0


def test_bilinear_is_exact_on_the_grid_and_monotone_between() -> None:
    xs, ys = [8, 16, 32], [4, 8]
    raw = np.array([[1.0, 3.0], [2.5, 2.0], [4.0, 6.0]])  # not monotone: 2.0 < 3.0
    t = monotone(raw)
    assert (np.diff(t, axis=0) >= 0).all() and (np.diff(t, axis=1) >= 0).all()
    for (i, x), (j, y) in itertools.product(enumerate(xs), enumerate(ys)):
        assert bilinear(xs, ys, t, x, y) == pytest.approx(t[i, j])
    vals = [bilinear(xs, ys, t, x, 6) for x in range(4, 40, 3)]
    assert vals == sorted(vals)


def test_overhead_fit_recovers_a_line() -> None:
    overhead, scale = fit_overhead([1.0, 2.0, 4.0], [0.5 + 0.8 * s for s in (1.0, 2.0, 4.0)])
    assert overhead == pytest.approx(0.5) and scale == pytest.approx(0.8)
    overhead, scale = fit_overhead([1.0], [0.7])
    assert scale == 1.0 and overhead == pytest.approx(-0.3)


@pytest.mark.slow
def test_real_pieces_and_validation_on_a_tiny_net(tmp_path, monkeypatch) -> None:
    """One real build (FP32, two levels, few repeats): the properties that survive noise;
    every panel's sessions are opened without spinning."""
    import pqd.measurement.runtime as runtime

    opened: list[bool] = []
    real_open = runtime.open_runner

    def recording_open(*args, spinning: bool = True, **kwargs):
        opened.append(spinning)
        return real_open(*args, spinning=spinning, **kwargs)

    monkeypatch.setattr(runtime, "open_runner", recording_open)
    lm = LatencyModel(
        tiny("tiny_cnn"),
        EXAMPLE,
        precision="fp32",
        levels=(0.5, 1.0),
        cache_dir=tmp_path,
        warmup=2,
        repeats=10,
    ).build()
    assert lm.pieces and all(v > 0 for v in lm.pieces.values())
    assert lm.cache_file.is_file() and lm.measured_pieces == len(lm.needed_pieces())
    assert lm.predict({}) > 0
    report = lm.validate(n=2)
    assert report["n"] == 2
    for row in report["candidates"]:
        assert row["measured_ms"] > 0
        err = abs(row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
        # the record rounds ms to 5 decimals: at ~0.02 ms that moves the error by ~1e-3
        rounding = 1e-5 * (1 + row["predicted_ms"] / row["measured_ms"]) / row["measured_ms"]
        assert row["error"] == pytest.approx(err, abs=rounding + 1e-5)
    assert report["worst_error"] >= report["median_error"] >= 0
    within = sum(row["error"] <= 0.10 for row in report["candidates"])
    assert report["within_10"] == within / 2
    lo, hi = report["within_10_ci"]
    assert lo <= report["within_10"] <= hi
    assert f"{within} of 2 within +-10%" in validation_text(report)
    assert opened and not any(opened)  # pieces, fit networks and candidates alike


def test_validation_text_in_the_fields_unit() -> None:
    """The share within +-10% with its interval; older reports without it still print."""
    v = {"n": 20, "median_error": 0.031, "worst_error": 0.12}
    assert validation_text(v) == "median 3.1%, worst 12.0%"
    v.update(within_10=0.9, within_10_ci=[0.699, 0.9721])  # Wilson of 18/20
    assert validation_text(v) == "median 3.1%, worst 12.0%, 18 of 20 within +-10% (90% [70, 97])"
