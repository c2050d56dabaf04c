"""Plots of evaluation rows (`kvjax.eval.harness`): quality vs the kept fraction of the context.

Three panels -- KL(full || compressed) [nats/token, log scale], continuation perplexity, needle
answer log-prob -- one line per (policy, regime), the full cache as a dashed reference line.
"""
from __future__ import annotations

import math
import pathlib
from typing import Sequence


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _x(row: dict, context: float) -> float:
    """The row's budget as a fraction of the context: the ratio budget when given (per-head/per-layer
    policies report their largest allocation in `kept`), else kept / context."""
    b = _num(row.get("budget"))
    if 0 < b <= 1:
        return b
    kept = _num(row["kept"])
    return kept / context if context == context else kept


def plot_quality(rows: Sequence[dict], path, title: str = "") -> pathlib.Path:
    """Write a PNG of KL / perplexity / needle log-prob against the kept fraction (budget) for every
    (policy, regime) series in `rows` (dicts with policy, regime, kept, kl, ppl, needle_logprob)."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    full = next((r for r in rows if r["policy"] == "full"), None)
    context = _num(full["kept"]) if full is not None else math.nan
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["policy"] == "full" or math.isnan(_num(r.get("kept"))):
            continue
        series.setdefault((r["policy"], r["regime"]), []).append(r)
    metrics = [("kl", "KL(full || compressed) [nats/token]", True), ("ppl", "continuation perplexity", False),
               ("needle_logprob", "needle answer log-prob [nats]", False)]
    fig = Figure(figsize=(16, 5))
    axes = fig.subplots(1, 3)
    styles = {"prefill": "-", "chunk": "--", "decode": ":"}
    cmap = matplotlib.colormaps["tab10" if len({p for p, _ in series}) <= 10 else "tab20"]
    policies = sorted({p for p, _ in series})
    for ax, (key, label, log) in zip(axes, metrics):
        for (policy, regime), rs in sorted(series.items()):
            pts = sorted((_x(r, context), _num(r[key])) for r in rs)
            pts = [(x, y) for x, y in pts if not math.isnan(y) and (not log or y > 0)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, styles.get(regime, "-."), marker="s" if regime == "quant" else "o", ms=4, color=cmap(policies.index(policy) % cmap.N),
                    label=f"{policy} ({regime})")
        if full is not None and key != "kl" and not math.isnan(_num(full[key])):
            ax.axhline(_num(full[key]), color="k", ls="--", lw=1, label="full cache")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("kept fraction of the context" if context == context else "kept tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    return path
