"""Outputs: JSON lines, the Markdown table, PNG charts."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

from .harness import FLOOR
from .sweeps import MODE_LABEL

MIB = 2**20


def to_json_line(record: dict) -> str:
    def clean(v):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        return v

    return json.dumps({k: clean(v) for k, v in record.items()}, sort_keys=False, default=str)


def read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _time_cell(rec: Optional[dict]) -> str:
    if rec is None:
        return ""
    if rec.get("status") != "ok":
        return rec.get("status", "?")
    return f"{_ms(rec['median_ms'])} ({_ms(rec['p20_ms'])}–{_ms(rec['p80_ms'])})"


def _mib(v) -> str:
    if v is None:
        return "—"
    v = v / MIB
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.01 else f"{v:.4f}"


def _err(v) -> str:
    if v is None:
        return "—"
    if v == 0:
        return "0"
    return f"{v:.1e}"


def header_lines(records: List[dict]) -> List[str]:
    if not records:
        return ["(no results)"]
    r = records[0]
    versions = f"torch {r.get('torch_version')}"
    if r.get("cuda_version"):
        versions += f" (CUDA {r.get('cuda_version')})"
    versions += f", triton {r.get('triton_version') or 'n/a'}, egma-kernels {r.get('package_version')}, Python {r.get('python_version')}"
    lines = [
        f"**Device:** {r.get('device_name')}  ",
        f"**Versions:** {versions}  ",
        f"**Date:** {r.get('timestamp')} (sweep `{r.get('sweep')}`, run {r.get('run_id')}"
        + (f", load average {r['load_average']:.1f}" if r.get("load_average") is not None else "")
        + ")  ",
    ]
    method = next((x.get("memory_method") for x in records if x.get("memory_method")), None)
    lines.append(
        "Times in ms: median (20th–80th percentile). ×floor: fwd+bwd time (fwd for retrieval or when fwd+bwd "
        "was not run) over the bare `(B*P)xD @ DxN` matmul. Memory of the same call, MiB: peak = inputs + scratch"
        + (f"; measured with {method}" if method else "")
        + ". Errors against the float64 reference on the same inputs: max |Δ| over the loss, its terms and "
        "I2T/T2I; grad: max |Δ| / max |ref| over the three gradients."
    )
    return lines


def markdown_table(records: List[dict], with_header: bool = True) -> str:
    """One row per (size, dtype, provider): the three modes' times, ×floor, memory, errors."""
    groups: "OrderedDict[tuple, Dict[str, Dict[str, dict]]]" = OrderedDict()
    for rec in records:
        key = (rec["size"], rec["dtype"])
        groups.setdefault(key, OrderedDict()).setdefault(rec["provider"], {})[rec["mode"]] = rec
    lines = []
    if with_header:
        lines += header_lines(records) + [""]
    lines.append(
        "| size | dtype | provider | fwd ms | bwd ms | fwd+bwd ms | ×floor | peak MiB | scratch MiB | max err | grad err | note |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (size, dtype), providers in groups.items():
        first = next(iter(next(iter(providers.values())).values()))
        if first["kind"] == "similarity":
            size_label = f"{size} ({first['B']} img × {first['R']} rep, P={first['P']}, N={first.get('N', '?')})"
        else:
            size_label = f"{size} (B={first['B']}, P={first['P']}, D={first['D']}, N={first.get('N', '?')})"
        for name, modes in providers.items():
            fwd, bwd, full = modes.get("forward"), modes.get("backward"), modes.get("full")
            main = full or fwd
            statuses = [m for m in modes.values() if m.get("status") != "ok"]
            note = ""
            if statuses:
                reasons = sorted({(m.get("status"), (m.get("reason") or "")[:90]) for m in statuses})
                note = "; ".join(f"{s}: {r}" if r else s for s, r in reasons)
            compiled = next((m for m in modes.values() if m.get("status") == "ok" and m.get("first_call_s")), None)
            if name == "reference-compiled" and compiled is not None:
                note = (note + "; " if note else "") + f"first call (compile) {compiled['first_call_s']:.0f} s"
            if name == FLOOR:
                lines.append(
                    f"| {size_label} | {dtype} | {name} | {_time_cell(fwd)} | | | 1.0 | | | | | {note} |"
                )
                continue
            ratio = f"{main['floor_ratio']:.1f}" if main and main.get("status") == "ok" and main.get("floor_ratio") else "—"
            mem = main if main and main.get("status") == "ok" else None
            errsrc = next((m for m in modes.values() if m.get("max_abs_err") is not None), None)
            kind_is_sim = first["kind"] == "similarity"
            lines.append(
                "| {size} | {dtype} | {name} | {fwd} | {bwd} | {full} | {ratio} | {peak} | {scratch} | {err} | {gerr} | {note} |".format(
                    size=size_label,
                    dtype=dtype,
                    name=name + (" (compat)" if kind_is_sim and main and main.get("egma_compat") else ""),
                    fwd=_time_cell(fwd),
                    bwd=_time_cell(bwd) if not kind_is_sim else "n/a",
                    full=_time_cell(full) if not kind_is_sim else "n/a",
                    ratio=ratio,
                    peak=_mib(mem.get("peak_bytes")) if mem else "—",
                    scratch=_mib(mem.get("scratch_bytes")) if mem else "—",
                    err=_err(errsrc.get("max_abs_err")) if errsrc else "—",
                    gerr=_err(errsrc.get("max_rel_grad_err")) if errsrc else "—",
                    note=note,
                )
            )
    return "\n".join(lines) + "\n"


def winner_lines(records: List[dict]) -> List[str]:
    """One line per (size, dtype, mode): the fastest provider (median), how much faster than the
    ``reference`` and than the runner-up."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in records:
        if r.get("status") == "ok" and r.get("provider") != FLOOR and r.get("median_ms"):
            groups.setdefault((r["size"], r["dtype"], r["mode"]), []).append(r)
    lines = []
    for (size, dtype, mode), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["median_ms"])
        best = recs[0]
        label = MODE_LABEL.get(mode, mode) if best.get("kind") != "similarity" else "retrieval fwd"
        text = f"- {size} {dtype} {label}: fastest **{best['provider']}** {_ms(best['median_ms'])} ms"
        if len(recs) == 1:
            lines.append(text + " (the only provider measured)")
            continue
        ref = next((r for r in recs if r["provider"] == "reference"), None)
        if ref is not None and ref is not best:
            text += f", {_faster(ref, best)} reference ({_ms(ref['median_ms'])} ms)"
        second = recs[1]
        if second is not ref:
            text += f", {_faster(second, best)} the next, {second['provider']} ({_ms(second['median_ms'])} ms)"
        lines.append(text)
    return lines


def _faster(other: dict, best: dict) -> str:
    ratio = other["median_ms"] / best["median_ms"]
    return f"{ratio:.1f}x faster than" if ratio >= 1.1 else "about as fast as"


def summary(records: List[dict]) -> str:
    """The winners, as a Markdown list under the table (empty when nothing was measured)."""
    lines = winner_lines(records)
    if not lines:
        return ""
    return "\nFastest provider per size and mode (medians):\n\n" + "\n".join(lines) + "\n"


def check_plotting() -> None:
    """Raise ``RuntimeError`` naming the install command when matplotlib (for ``--plot``) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'egma-kernels[bench]' (or pip install matplotlib)") from exc


def write_plots(records: List[dict], out_dir: str) -> List[str]:
    """Time and memory against size, one line per provider, for each (kind, dtype, mode). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("--plot needs matplotlib: pip install 'egma-kernels[bench]' (or pip install matplotlib)") from exc
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ok = [r for r in records if r.get("status") == "ok"]
    combos = OrderedDict()
    for r in ok:
        combos.setdefault((r["kind"], r["dtype"], r["mode"]), []).append(r)
    floors = [r for r in ok if r["provider"] == FLOOR]
    for (kind, dtype, mode), recs in combos.items():
        if mode != "forward":  # the floor (one matmul) is recorded once, as a forward; draw it on every chart
            recs = recs + [r for r in floors if r["kind"] == kind and r["dtype"] == dtype]
        sizes = list(OrderedDict.fromkeys(r["size"] for r in recs))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in recs))
        metrics = [("time", "median_ms", "time (ms, median; bars 20th-80th pct)")]
        if mode != "backward":  # backward's memory is that of forward+backward
            metrics.append(("memory", "peak_bytes", "peak memory (MiB)"))
        for metric, field, ylabel in metrics:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drew = False
            for p in providers:
                xs, ys, lo, hi = [], [], [], []
                for i, s in enumerate(sizes):
                    r = next((r for r in recs if r["provider"] == p and r["size"] == s), None)
                    if r is None or r.get(field) is None or (metric == "memory" and r["provider"] == FLOOR):
                        continue
                    xs.append(i)
                    if metric == "time":
                        ys.append(r["median_ms"])
                        lo.append(r["median_ms"] - r["p20_ms"])
                        hi.append(r["p80_ms"] - r["median_ms"])
                    else:
                        ys.append(r[field] / MIB)
                if not xs:
                    continue
                drew = True
                style = "--" if p == FLOOR else "-"
                if metric == "time":
                    ax.errorbar(xs, ys, yerr=[lo, hi], label=p, marker="o", linestyle=style, capsize=3)
                else:
                    ax.plot(xs, ys, label=p, marker="o", linestyle=style)
            if not drew:
                plt.close(fig)
                continue
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels(sizes, rotation=20)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            label = MODE_LABEL.get(mode, mode) if kind == "loss" else "retrieval fwd"
            ax.set_title(f"{'fine_grained_loss' if kind == 'loss' else 'filip_similarity'} {label}, {dtype} — {recs[0].get('device_name', '')}"[:90], fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{metric}_{kind}_{dtype}_{mode}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
