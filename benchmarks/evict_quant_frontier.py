"""Eviction x quantization at equal bytes on SmolLM2: KL / perplexity / needle against cache bytes.

    python benchmarks/evict_quant_frontier.py                        # KJV, writes docs/evict_quant/frontier.*
    python benchmarks/evict_quant_frontier.py --text-file my.txt --out /tmp/my_frontier --needle-per-kind 0

For every byte budget (a fraction of the bf16 full cache of the context) and every family -- a scoring
policy over the dense bf16 cache (SnapKV, H2O), a KIVI cache alone, a policy whose kept tokens KIVI
stores (`kvjax.quant.evicted`), or a policy whose evicted tokens are demoted to KIVI-2 instead of dropped
(`snapkv~kivi2`, `snapkv+kivi4:residual=32~kivi2`: `kvjax.quant.demote`; `snapkv~kivi2:budget=0.1`: only the
10% next-best evicted tokens demoted, the rest dropped) -- the token budget is the largest whose cache fits the bytes
(`kvjax.eval.frontier.tokens_for_bytes`: the real layout's bytes, fp residual windows, statistics
and per-slot positions included). A quantized cache alone keeps every token, so it is one point at
its own fraction, listed under every budget it fits. Each row: KL(full || row) and perplexity over
a teacher-forced continuation (one forward after the context), and the question-agnostic needle
tasks (`kvjax.eval.needle`: haystack compressed, then question + answer fed; token budgets chosen
for the haystack length at the same byte fraction). Every cache (the full reference too) holds its
fp parts in bf16; the model computes in float32 (CPU).

Writes <out>.json (rows + setup, rewritten after every row) and, at the end, <out>.md and <out>.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax.eval import fidelity, needle, text as textlib  # noqa: E402
from kvjax.eval.frontier import (context_bytes, full_bytes, parse_family, parse_fractions,  # noqa: E402
                                 run_family, tokens_for_bytes)

FAMILIES = ("snapkv", "h2o", "kivi4", "kivi2", "snapkv+kivi4:residual=32", "snapkv+kivi2:residual=32",
            "h2o+kivi4:residual=32", "h2o+kivi2:residual=32", "snapkv~kivi2", "snapkv+kivi4:residual=32~kivi2")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-file", help="UTF-8 text for the context and continuation (default: the KJV, Genesis on)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=2000, help="context tokens")
    ap.add_argument("--continuation", type=int, default=128, help="continuation tokens (KL, perplexity)")
    ap.add_argument("--fractions", default="0.25,0.1,0.05", help="byte budgets as fractions of the bf16 full cache")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help="policy | kivi cache | policy+kivi cache[:opt=v], comma-separated")
    ap.add_argument("--needle-per-kind", type=int, default=1, help="needle samples per task kind (0: no needle)")
    ap.add_argument("--needle-tokens", type=int, default=1024)
    ap.add_argument("--out", default="docs/evict_quant/frontier", help="output path without extension")
    ap.add_argument("--merge", help="comma-separated .json outputs of earlier runs (same text and lengths) to "
                                    "combine into --out instead of running")
    args = ap.parse_args(argv)
    for name in ("context", "continuation", "needle_tokens"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.needle_per_kind < 0:
        ap.error("--needle-per-kind must be >= 0")
    return args


def _nan_row(**kw) -> dict:
    row = dict(target=None, family="", kind="", kept=None, kept_needle=None, bytes=None, bytes_fraction=math.nan,
               kl=math.nan, kl_max=math.nan, ppl=math.nan, needle_logprob=math.nan, needle_acc=math.nan,
               needle_exact=math.nan, cache_bytes_allocated=None, prefill_s=math.nan, note="")
    row.update(kw)
    return row


def plan_rows(config, families, fractions, context: int, needle_context: int) -> list[dict]:
    """Rows to run: every (fraction, family) with its token budgets (a quantized cache alone: one
    row at its own fraction); families that do not fit a fraction get a row with the reason."""
    full_ctx, full_ndl = full_bytes(config, context), full_bytes(config, needle_context)
    rows = [_nan_row(family="full (bf16)", kind="full", kept=context, kept_needle=needle_context, bytes=full_ctx,
                     bytes_fraction=1.0)]
    for fam in families:
        if fam.policy is None:
            own = context_bytes(config, fam, context, context) / full_ctx
            fits = [f for f in fractions if own <= f]
            rows.append(_nan_row(target=max(fits) if fits else None, family=fam.name, kind=fam.kind, kept=context,
                                 kept_needle=needle_context, bytes=round(own * full_ctx), bytes_fraction=own,
                                 note=(f"fits the {', '.join(f'{100 * f:g}%' for f in fits)} budget(s)" if fits else
                                       "larger than every byte budget: its own point")))
            continue
        for f in fractions:
            keep = tokens_for_bytes(config, fam, f * full_ctx, context)
            if keep is None:
                note = "does not fit: not one token"
                if fam.demote:   # demotion keeps every token: its low-precision copy is the floor
                    floor = context_bytes(config, fam, 1, context) / full_ctx
                    note += f" (with 1 kept token the demoted {fam.demote} copy of the context is {100 * floor:.1f}%)"
                rows.append(_nan_row(target=f, family=fam.name, kind=fam.kind, note=note))
                continue
            keep_n = tokens_for_bytes(config, fam, f * full_ndl, needle_context)
            b = context_bytes(config, fam, keep, context)
            rows.append(_nan_row(target=f, family=fam.name, kind=fam.kind, kept=keep, kept_needle=keep_n, bytes=b,
                                 bytes_fraction=b / full_ctx))
    return rows


def run(args) -> dict:
    from tqdm.auto import tqdm
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    t_start = time.perf_counter()
    fractions = parse_fractions(args.fractions)
    config, params = load_model(args.model, progress=False)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    families = [parse_family(s, params, config) for s in args.families.split(",") if s.strip()]
    tokenizer = load_tokenizer(args.model)
    if args.text_file:
        raw, source = textlib.read_text_file(args.text_file), f"--text-file {args.text_file}"
    else:
        raw, source = textlib.kjv_text(n_chars=8 * (args.context + args.continuation)), "King James Bible (Genesis on)"
    ctx, cont = fidelity.split_text(tokenizer, raw, args.context, args.continuation)
    ctx, cont = jnp.asarray([ctx], jnp.int32), jnp.asarray([cont], jnp.int32)
    tasks = {"fidelity": (ctx, cont, None)}
    if args.needle_per_kind:
        samples = needle.make_samples(tokenizer, ("passkey", "kv"), args.needle_per_kind, args.needle_tokens)
        prompts, answers, mask = needle.answer_batch(samples, query_aware=False)
        tasks["needle"] = (jnp.asarray(prompts), jnp.asarray(answers), mask)
    needle_ctx = tasks["needle"][0].shape[1] if "needle" in tasks else args.context
    rows = plan_rows(config, families, fractions, args.context, needle_ctx)
    by_name = {f.name: f for f in families}
    meta = dict(model=args.model, backend=jax.default_backend(), text=source, context_tokens=args.context,
                continuation_tokens=args.continuation, fractions=list(fractions),
                needle=(f"{args.needle_per_kind} x passkey+kv at {args.needle_tokens} tokens, depths 0.5-0.9, "
                        f"question-agnostic (haystack of {needle_ctx} tokens compressed, then question + answer fed)"
                        if args.needle_per_kind else "none"),
                dtype="cache (fp parts) bfloat16, model float32",
                command="python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                commit=_commit(), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = fidelity.Runner()
    full = {}
    first = 0.1 if 0.1 in fractions else fractions[0]      # the full cache, then the headline budget first
    todo = sorted((r for r in rows if r["kept"] is not None),
                  key=lambda r: (r["kind"] != "full", r["target"] != first))
    bar = tqdm(todo, desc="frontier", unit="row")
    for row in bar:
        bar.set_postfix_str(f"{row['family']} {row['target'] or ''}")
        fam = by_name.get(row["family"])
        try:
            for key, (tokens, targets, mask) in tasks.items():
                keep = row["kept"] if key == "fidelity" else row["kept_needle"]
                if fam is not None and keep is None:
                    row["note"] = (row["note"] + "; " if row["note"] else "") + f"{key}: does not fit"
                    continue
                pre, logp, cache = run_family(params, config, fam, keep, tokens, targets, runner)
                if key == "fidelity":
                    if fam is None:
                        full[key] = logp
                    m = fidelity.fidelity_metrics(full["fidelity"], logp, targets)
                    row.update(kl=m["kl"], kl_max=m["kl_max"], ppl=m["ppl"], prefill_s=pre.seconds,
                               cache_bytes_allocated=cache.memory_bytes())
                else:
                    s = needle.score_answers(logp, targets, mask)
                    row.update(needle_logprob=float(s["logprob"].mean()), needle_acc=float(s["acc"].mean()),
                               needle_exact=float(s["exact"].mean()))
        except Exception as err:   # keep the sweep going; the row says why
            row["note"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            print(f"warning: {row['family']} {row['target']}: {row['note']}", file=sys.stderr)
        meta.update(wall_s=round(time.perf_counter() - t_start, 1), compile_s=round(runner.compile_s, 1))
        _write_json(out, meta, rows)       # all outputs after every row: an interrupted sweep keeps its rows
        (out.with_suffix(".md")).write_text(markdown(rows, meta, fractions, out.with_suffix(".png").name))
        plot(rows, out.with_suffix(".png"), f"{args.model}, {source}: quality vs cache bytes")
    return dict(meta=meta, rows=rows)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def _write_json(out: pathlib.Path, meta: dict, rows: list) -> None:
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    out.with_suffix(".json").write_text(json.dumps(
        dict(meta=meta, rows=[{k: clean(v) for k, v in r.items()} for r in rows]), indent=1))


def _f(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}"


def best_at(rows, fraction: float, kinds) -> dict | None:
    """The lowest-KL row of `kinds` that fits `fraction` (a quantized cache alone: its own fraction)."""
    fit = [r for r in rows if r["kind"] in kinds and r["bytes_fraction"] <= fraction and not math.isnan(r["kl"])
           and (r["target"] == fraction or r["kind"] == "quantization")]
    return min(fit, key=lambda r: r["kl"]) if fit else None


def markdown(rows, meta, fractions, png: str) -> str:
    head = ["budget", "method", "kept tokens (ctx / needle)", "bytes % of bf16", "KL", "KL max", "ppl",
            "needle logprob", "needle acc", "needle exact", "cache MiB (+cont.)", "notes"]
    lines = [f"# Eviction x quantization at equal bytes ({meta['model']})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["Bytes: the cache the engine allocates for the context (fp parts bf16; codes, fp16 statistics, fp "
              "residual windows, per-slot positions included), as a fraction of the bf16 full cache of the "
              "context; `cache MiB` is what was allocated during the continuation (room for its tokens "
              "included). Token budgets are the largest that fit the bytes. Combinations use KIVI with R = 32 "
              "(the default R = 128 fp window alone is ~7% of the bf16 bytes of a 2000-token context); `policy~kivi2` "
              "rows keep the policy's evicted tokens in KIVI-2 (R = G = 32) instead of dropping them, so the "
              "kept-token budget is what the bytes left over by that copy of the context buy; `policy~kivi2:budget=x` "
              "demotes only the x * context next-best evicted tokens (by the policy's scores) and drops the rest "
              "(partial demotion: a kept/demoted split of the bytes). KL = mean "
              "KL(full || method) of the next-token distributions over the continuation (nats/token).", ""]
    lines += ["## Best at each budget", "", "| budget | best single method | KL | best combination | KL |",
              "|---|---|---|---|---|"]
    for f in fractions:
        s, c = best_at(rows, f, ("eviction", "quantization")), best_at(rows, f, ("combination",))
        lines.append(f"| {100 * f:g}% | {s['family'] if s else '-'} | {_f(s['kl']) if s else '-'} | "
                     f"{c['family'] if c else '-'} | {_f(c['kl']) if c else '-'} |")
    lines += ["", "## All rows", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (-(r["target"] or 2), r["kind"] != "full", r["kind"], r["family"]))
    for r in order:
        mib = "-" if r["cache_bytes_allocated"] is None else f"{r['cache_bytes_allocated'] / 2 ** 20:.2f}"
        cells = ["-" if r["target"] is None else f"{100 * r['target']:g}%", r["family"],
                 f"{_f(r['kept'])} / {_f(r['kept_needle'])}",
                 "-" if math.isnan(r["bytes_fraction"]) else f"{100 * r['bytes_fraction']:.2f}",
                 _f(r["kl"]), _f(r["kl_max"]), _f(r["ppl"]), _f(r["needle_logprob"], 3), _f(r["needle_acc"], 2),
                 _f(r["needle_exact"], 2), mib, r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![KL vs bytes]({png})", ""]
    return "\n".join(lines)


def plot(rows, path, title: str) -> None:
    """KL (log y), perplexity and needle log-prob against the byte fraction, one line per family."""
    from matplotlib.figure import Figure
    full = next(r for r in rows if r["kind"] == "full")
    fams = sorted({r["family"] for r in rows if r["kind"] != "full"})
    fig = Figure(figsize=(16, 5))
    axes = fig.subplots(1, 3)
    style = {"eviction": "-", "quantization": "none", "combination": "--"}
    for ax, (key, label, log) in zip(axes, (("kl", "KL(full || method) [nats/token]", True),
                                            ("ppl", "continuation perplexity", False),
                                            ("needle_logprob", "needle answer log-prob [nats]", False))):
        for i, fam in enumerate(fams):
            pts = sorted({(r["bytes_fraction"], r[key]) for r in rows if r["family"] == fam
                          and not math.isnan(r[key]) and (not log or r[key] > 0)})
            if not pts:
                continue
            kind = next(r["kind"] for r in rows if r["family"] == fam)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, linestyle=style[kind], marker="s" if kind == "quantization" else "o", ms=5,
                    color=f"C{i % 10}", label=fam)
        if key != "kl" and not math.isnan(full[key]):
            ax.axhline(full[key], color="k", ls=":", lw=1, label="full cache (bf16)")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("cache bytes / bf16 full cache of the context")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=110)


def merge(paths, out) -> None:
    """One table from several runs' JSON (e.g. a sweep split over budgets): rows in order, one full-cache
    row (the runs must agree on it: same text, lengths and model)."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    nan = lambda r: {k: (math.nan if v is None and k in _nan_row() and isinstance(_nan_row()[k], float) else v)
                     for k, v in r.items()}
    rows, fulls = [], []
    for data in runs:
        for r in map(nan, data["rows"]):
            if (r["kept"] is not None and math.isnan(r["kl"]) and not r["note"].startswith("error")
                    and "does not fit" not in r["note"]):
                continue        # planned but not run (an interrupted sweep)
            (fulls if r["kind"] == "full" else rows).append(r)
    if len({(r["kept"], round(r["ppl"], 5)) for r in fulls}) != 1:
        raise ValueError(f"the runs disagree on the full cache ({[(r['kept'], r['ppl']) for r in fulls]}): "
                         f"different texts or lengths cannot share one table")
    fractions = tuple(sorted({f for d in runs for f in d["meta"]["fractions"]}, reverse=True))
    meta = dict(runs[0]["meta"], fractions=list(fractions), command=" ; ".join(d["meta"]["command"] for d in runs),
                wall_s=sum(d["meta"]["wall_s"] for d in runs), compile_s=sum(d["meta"]["compile_s"] for d in runs),
                merged_from=", ".join(map(str, paths)))
    rows = fulls[:1] + rows
    out = pathlib.Path(out)
    _write_json(out, meta, rows)
    out.with_suffix(".md").write_text(markdown(rows, meta, fractions, out.with_suffix(".png").name))
    plot(rows, out.with_suffix(".png"), f"{meta['model']}, {meta['text']}: quality vs cache bytes")


if __name__ == "__main__":
    _args = parse_args()
    if _args.merge:
        merge([p for p in _args.merge.split(",") if p.strip()], _args.out)
    else:
        run(_args)
