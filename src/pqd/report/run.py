"""The report of one run (``report.md``), rendered from its ``record.json``."""

from __future__ import annotations

from typing import Any

from pqd.markdown import (
    table,
)
from pqd.report.text import (
    _mb,
    _pct,
    ci_text,
    kernel_summary,
    noisy_latency,
    notes_text,
    paired_text,
    points_text,
    seconds_text,
    speed_text,
)


def summary_rows(record: dict[str, Any]) -> list[list[str]]:
    """Rows of the baseline-vs-final table: artifact, precision, accuracy, MB, ms, sparsity."""
    rows = []
    for key in ("baseline", "final"):
        r = record[key]
        lat = r["latency_ms"]
        big = [b for b in lat.get("batches", {}) if b != "1"]
        big_txt = f"{lat['batches'][big[0]]['p50']:.2f} (b{big[0]})" if big else "-"
        rows.append(
            [
                key,
                r["precision"],
                f"{_pct(r['accuracy'])} {ci_text(r.get('accuracy_ci'))}".strip(),
                _mb(r["size_bytes"]),
                f"{lat['p50']:.3f}",
                f"{lat['p90']:.3f}",
                big_txt,
                _pct(r["sparsity"]),
                f"{r['macs'] / 1e6:.1f}",
                f"{r['bitops'] / 1e9:.2f}",
            ]
        )
    return rows


SUMMARY_HEADER = [
    "artifact",
    "precision",
    "top-1 [95% CI]",
    "MB",
    "p50 ms (b1)",
    "p90 ms (b1)",
    "p50 ms (large b)",
    "sparsity",
    "MMACs",
    "GBitOps",
]


def parity_warnings(record: dict[str, Any]) -> list[str]:
    """One line per artifact whose measured answers are untrustworthy on this machine: its
    ``parity_problems`` (see :func:`pqd.target.assess`, cause first) joined, with the fix."""
    lines = []
    for key in ("baseline", "final"):
        art = record[key]
        if problems := art.get("parity_problems", []):
            lines.append(
                f"{key} ({art.get('artifact', key)}, built for target "
                f"{art.get('target', '?')}): {'; '.join(problems)}; fix: rebuild it for this "
                f"CPU (export.target: portable, or auto on the deployment machine)"
            )
    return lines


def target_section(record: dict[str, Any]) -> list[str]:
    """The report's "Deployment target" section: what the INT8 file was built for, what this
    CPU's kernels are, the saturation check read from the file and the parity verdict."""
    final, env = record["final"], record["environment"]
    sat = final.get("saturation") or {}
    target = final.get("target", "?")
    lines = [
        "## Deployment target",
        "",
        f"- final.onnx built for target **{target}**; measured on a CPU with "
        f"{env.get('kernels') or ', '.join(env['cpu_flags']) or 'unknown kernels'}.",
    ]
    if sat.get("checked_layers"):
        lines.append(
            f"- int8 weight pairs that can saturate the int16 sums of x86 kernels without VNNI: "
            f"{sat['pairs_at_risk']} (in {len(sat['layers'])} of {sat['checked_layers']} "
            f"layers; largest same-sign pair |w_a| + |w_b| = {sat['max_pair_magnitude']}, "
            f"safe up to 128)"
        )
    warnings = parity_warnings(record)
    if "parity_ok" in final:
        lines.append(
            "- parity: "
            + (
                "ok (every runtime's top-1 agreement with the torch model is within the threshold)"
                if not warnings
                else "**FAILED**"
            )
        )
    lines += [f"  - {w}" for w in warnings]
    return lines


def render_markdown(record: dict[str, Any]) -> str:
    """The run's report.md."""
    final, cmp_ = record["final"], record["comparison"]
    env = record["environment"]
    data = record["data"]
    runtime = final["runtime"]
    lines = [
        f"# pqd run: {record['name']}",
        "",
        f"Order: **{' -> '.join(record['order']) or '(no stages)'}** on "
        f"`{record['recipe']['model']['name']}`, {data['name']} "
        f"({data['train']} train / {data['val']} val / {data['test']} test images), "
        f"seed {record['seed']}.",
        "",
        f"Final vs baseline on {runtime} ({env['measure_threads']} threads): "
        f"**{speed_text(cmp_['speedup_batch1_p50'])} at batch 1**, "
        f"**{cmp_['size_ratio']:.2f}x smaller**, "
        f"accuracy {points_text(-cmp_['accuracy_drop_points'])}.",
        "",
        table(SUMMARY_HEADER, summary_rows(record)),
        "",
        "Accuracy is the artifact's own top-1 on the test split, run through the runtime, "
        "with its 95% Wilson interval; latency is wall-clock per call, both artifacts timed in "
        "interleaved rounds.",
        "",
        *([paired_text(cmp_["paired"]) + ".", ""] if cmp_.get("paired") else []),
        *_speed_notes(record),
        "## Stages",
        "",
    ]
    lines.append(stages_table(record["stages"]))
    if final.get("early_exit"):
        lines += ["", *early_exit_section(final["early_exit"])]
    lines += ["", "## Runtimes", ""]
    lines.append(runtimes_table(record))
    lines += deploy_lines(final)
    lines += [
        "",
        "Top-1 agreement: the share of test images where the ONNX file in this "
        "runtime predicts the same class as its own torch model; 99% or more is normal "
        "(INT8 rounding flips a few borderline images); less points at an export "
        "problem or at a file built for another CPU (see Deployment target).",
    ]
    lines += ["", *target_section(record)]
    if final.get("audit"):
        from pqd.report_audit import audit_section

        lines += ["", *audit_section(record)]
    lines += ["", *environment_lines(env, record["timing_s"]), ""]
    if data.get("subset_note"):
        lines += [f"Note: {data['subset_note']}", ""]
    return "\n".join(lines)


def stages_table(stages: list[dict[str, Any]]) -> str:
    """The report's table of stages: epochs, seconds, validation top-1, notes."""
    stage_rows = [
        [
            str(s["index"] + 1),
            s["name"],
            str(s["config"].get("epochs", "-")),
            f"{s['seconds']:.1f}",
            _pct(s["val_accuracy"]),
            notes_text(s["info"]),
        ]
        for s in stages
    ]
    header = ["#", "stage", "epochs", "seconds", "val top-1", "notes"]
    no_stages = "(no stages: the final model is the baseline)"
    return table(header, stage_rows) if stage_rows else no_stages


def runtimes_table(record: dict[str, Any]) -> str:
    """Both files on every runtime: top-1, batch-1 p50/p90 (ms), agreement with torch."""
    rt_rows = []
    for key in ("baseline", "final"):
        for rt, res in record[key]["runtimes"].items():
            lat = res["latency_ms"]
            rt_rows.append(
                [
                    key,
                    f"{rt} {res['version']}",
                    _pct(res["accuracy"]),
                    f"{lat['p50']:.3f}",
                    f"{lat['p90']:.3f}",
                    f"{100 * res['parity']['top1_agreement']:.2f}%",
                ]
            )
    return table(
        [
            "artifact",
            "runtime",
            "top-1",
            "p50 ms (b1)",
            "p90 ms (b1)",
            "top-1 agreement with torch",
        ],
        rt_rows,
    )


def environment_lines(env: dict[str, Any], timing: dict[str, float]) -> list[str]:
    """The report's environment section: CPU and flags, threads, libraries, step times (s)."""
    libs = env["libraries"]
    return [
        "## Environment",
        "",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs; "
        f"{', '.join(env['cpu_flags']) or 'no VNNI/AVX-512 flags'})",
        f"- measured with {env['measure_threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in libs.items()),
        f"- time: baseline {timing['baseline']:.0f} s, stages "
        f"{timing['stages']:.0f} s, export {timing['export']:.0f} s, "
        f"measurement {timing['measure']:.0f} s, total {seconds_text(timing)}",
    ]


def early_exit_rows(ee: dict[str, Any]) -> list[list[str]]:
    """One row per exit and the final head: position, threshold, test top-1 of that head,
    fraction of test inputs leaving there, MACs of leaving there."""
    macs = ee["part_macs"]
    rows, run = [], 0
    n = len(ee["thresholds"])
    for k in range(n + 1):
        run += macs["segments"][k] + (macs["heads"][k] if k < n else 0)
        t = ee["thresholds"][k] if k < n else None
        rows.append(
            [
                f"exit {k}" if k < n else "final",
                str(ee["positions"][k]) if k < n else "-",
                ("never" if t is None else f"{t:.3f}") if k < n else "-",
                _pct(ee["per_exit_accuracy"][k]),
                _pct(ee["exit_fractions"][k]),
                f"{run / 1e6:.1f}",
            ]
        )
    return rows


def early_exit_section(ee: dict[str, Any]) -> list[str]:
    """The report's "Early exit" section (from ``final.early_exit`` of a record)."""
    lat, ref, seg = ee["latency_ms"], ee["no_exit_latency_ms"], ee["segments_no_heads_latency_ms"]
    target = ", ".join(f"{k} {v}" for k, v in ee["target"].items())
    lines = [
        "## Early exit",
        "",
        f"Exits after blocks {ee['positions']} ({ee['confidence']} confidence); thresholds "
        f"calibrated on the validation split for {target} "
        f"({'met' if ee['target_met'] else 'NOT met'} on val). On the test split, against "
        f"the same weights with exits disabled: **mean batch-1 latency "
        f"{speed_text(ee['speedup_mean'])}**, accuracy {points_text(-ee['accuracy_drop_points'])} "
        f"({_pct(ee['accuracy_with_exits'])} vs {_pct(ee['accuracy_no_exits'])}), expected "
        f"MACs {100 * ee['expected_macs_fraction']:.1f}% of the network.",
        "",
        table(
            [
                "head",
                "after block",
                "threshold",
                "test top-1 of head",
                "leave here",
                "MMACs to here",
            ],
            early_exit_rows(ee),
        ),
        "",
        table(
            ["batch-1 latency over the test split (ms)", "mean", "p50", "p90"],
            [
                [
                    "with exits: exits.onnx (one graph, If nodes)",
                    f"{lat['mean']:.3f}",
                    f"{lat['p50']:.3f}",
                    f"{lat['p90']:.3f}",
                ],
                *(
                    [
                        [
                            "with exits: part files called in turn",
                            f"{f['mean']:.3f}",
                            f"{f['p50']:.3f}",
                            f"{f['p90']:.3f}",
                        ]
                    ]
                    if (f := ee.get("files_latency_ms"))
                    else []
                ),
                [
                    "exits disabled: final.onnx (reference)",
                    f"{ref['mean']:.3f}",
                    f"{ref['p50']:.3f}",
                    f"{ref['p90']:.3f}",
                ],
                [
                    "exits disabled: segments back to back",
                    f"{seg['mean']:.3f}",
                    f"{seg['p50']:.3f}",
                    f"{seg['p90']:.3f}",
                ],
            ],
        ),
        "",
        f"Each image is one call, {lat['samples']} calls per row ({lat['rounds']} passes over "
        f"{lat['samples'] // lat['rounds']} test images, rows taking turns); "
        f"{ee['runtime']}; files and thresholds in `{ee['manifest']}`.",
    ]
    return lines


def deploy_lines(final: dict[str, Any]) -> list[str]:
    """ "Deploy with X" for the final artifact (the runtime fastest at most measured batch
    sizes), each batch's winner with its settings, and what onnxruntime runs in float."""
    fastest = final.get("fastest") or {}
    if not fastest:
        return []
    votes = [f["runtime"] for f in fastest.values()]
    pick = max(dict.fromkeys(votes), key=votes.count)
    lines = ["", f"Deploy with {pick}: the fastest runtime for the final artifact at batch "]
    lines[-1] += ", ".join(
        f"{b} ({f['runtime']} {f['p50_ms']:.3f} ms"
        + "".join(f" vs {rt} {v:.3f}" for rt, v in f["others_p50_ms"].items())
        + ")"
        for b, f in fastest.items()
    )
    lines[-1] += f". Settings: {notes_text(fastest[next(iter(fastest))]['settings'])}."
    ort = final.get("runtimes", {}).get("onnxruntime", {})
    if "float_ops" in ort and "int8" in str(final.get("precision", "")):
        ops = "; ".join(f"{r['op']} x{r['count']} ({r['why']})" for r in ort["float_ops"])
        lines.append(
            f"onnxruntime runs in float: {ops or 'nothing (every op is integer)'}; "
            f"{ort['transposes']} layout transposes."
        )
    return lines


def _speed_notes(record: dict[str, Any]) -> list[str]:
    """Lines under the summary: a noisy-machine warning, and why INT8 is not faster."""
    lines = []
    noisy = [k for k in ("baseline", "final") if noisy_latency(record[k]["latency_ms"])]
    if noisy:
        lines += [
            f"Warning: the batch-1 p90 of {' and '.join(noisy)} is more than 2x its p50: "
            "other load on this machine disturbed the timing; measure again on an idle "
            "machine before trusting the speedup.",
            "",
        ]
    final = record["final"]
    speedup = record["comparison"]["speedup_batch1_p50"]
    kernels = final.get("runtimes", {}).get(final["runtime"], {}).get("kernels")
    if "int8" in str(final.get("precision", "")) and speedup < 1.0 and kernels:
        lines += [
            f"INT8 is not faster here. The optimized {final['runtime']} graph has "
            f"{kernel_summary(kernels)} (each float conv, Q/DQ pair and transpose is "
            "time spent outside the fused INT8 kernels).",
            "",
        ]
    return lines
