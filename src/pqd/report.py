"""Human-readable reports rendered from record.json (never from live objects).

``pqd report RUN_DIR`` re-renders ``report.md`` from the stored record, so a
report can always be regenerated and never disagrees with the record.
"""

from __future__ import annotations

from typing import Any


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def summary_rows(record: dict[str, Any]) -> list[list[str]]:
    """Rows of the baseline-vs-final table: artifact, precision, accuracy, MB, ms, sparsity."""
    rows = []
    for key in ("baseline", "final"):
        r = record[key]
        lat = r["latency_ms"]
        big = [b for b in lat.get("batches", {}) if b != "1"]
        big_txt = f"{lat['batches'][big[0]]['p50']:.2f} (b{big[0]})" if big else "-"
        rows.append([
            key, r["precision"], _pct(r["accuracy"]), _mb(r["size_bytes"]),
            f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", big_txt, _pct(r["sparsity"]),
            f"{r['macs'] / 1e6:.1f}", f"{r['bitops'] / 1e9:.2f}",
        ])
    return rows


SUMMARY_HEADER = ["artifact", "precision", "top-1", "MB", "p50 ms (b1)", "p90 ms (b1)",
                  "p50 ms (large b)", "sparsity", "MMACs", "GBitOps"]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


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
        f"**{cmp_['speedup_batch1_p50']:.2f}x faster at batch 1**, "
        f"**{cmp_['size_ratio']:.2f}x smaller**, "
        f"accuracy {-cmp_['accuracy_drop_points']:+.2f} points.",
        "",
        table(SUMMARY_HEADER, summary_rows(record)),
        "",
        "Accuracy is the artifact's own top-1 on the test split, run through the runtime; "
        "latency is wall-clock per call, both artifacts timed in interleaved rounds.",
        "",
        "## Stages",
        "",
    ]
    stage_rows = [[str(s["index"] + 1), s["name"], str(s["config"].get("epochs", "-")),
                   f"{s['seconds']:.1f}", _pct(s["val_accuracy"]),
                   ", ".join(f"{k}={_fmt(v)}" for k, v in s["info"].items()) or "-"]
                  for s in record["stages"]]
    header = ["#", "stage", "epochs", "seconds", "val top-1", "notes"]
    no_stages = "(no stages: the final model is the baseline)"
    lines.append(table(header, stage_rows) if stage_rows else no_stages)
    lines += ["", "## Runtimes", ""]
    rt_rows = []
    for key in ("baseline", "final"):
        for rt, res in record[key]["runtimes"].items():
            lat = res["latency_ms"]
            rt_rows.append([key, f"{rt} {res['version']}", _pct(res["accuracy"]),
                            f"{lat['p50']:.3f}", f"{lat['p90']:.3f}",
                            f"{100 * res['parity']['top1_agreement']:.2f}%"])
    lines.append(table(["artifact", "runtime", "top-1", "p50 ms (b1)", "p90 ms (b1)",
                        "top-1 agreement with torch"], rt_rows))
    libs = env["libraries"]
    lines += [
        "",
        "## Environment",
        "",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs; "
        f"{', '.join(env['cpu_flags']) or 'no VNNI/AVX-512 flags'})",
        f"- measured with {env['measure_threads']} threads; "
        + ", ".join(f"{k} {v}" for k, v in libs.items()),
        f"- time: baseline {record['timing_s']['baseline']:.0f} s, stages "
        f"{record['timing_s']['stages']:.0f} s, export {record['timing_s']['export']:.0f} s, "
        f"measurement {record['timing_s']['measure']:.0f} s, total "
        f"{record['timing_s']['total']:.0f} s",
        "",
    ]
    if data.get("subset_note"):
        lines += [f"Note: {data['subset_note']}", ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
