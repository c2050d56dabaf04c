"""End-to-end engine benchmark (GPU): prefill and decode of a random-init Llama-3-8B through
`kvjax.generate`, per (batch, context) and KV method, against ceilings measured in the same run.

    # default: 8x16384 and 8x32768, methods dense,kivi4,kivi2,snapkv10,streaming10,knorm_chunk
    PYTHONUNBUFFERED=1 PYTHONPATH=. timeout 590 python3 benchmarks/e2e.py --budget-s 540 2>&1 | tee $OUT/e2e.log
    # one shape per call when the default set does not fit one 10-minute call
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/e2e.py --shapes 8x32768 --methods dense,kivi4,snapkv10
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/e2e.py --shapes 1x65536,32x16384 --skip-torch
    # CPU smoke test (2 layers, d_model 128; ~1 min on 2 cores)
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/e2e.py --tiny

Do not pipe through `grep` (a run stopped by its time limit would then print nothing); every row
is printed as it finishes and the JSON (`--out`, default `$OUT/e2e.json`) is rewritten after
every row, so a run cut short keeps what it measured.

Method names (`--methods`): `dense` (bf16 cache), `kivi4` / `kivi2` (KIVI caches,
`kvjax.quant.make_cache_init`), `snapkv10` (SnapKV keeping 10 % after prefill), `streaming10`
(StreamingLLM, 10 %), `knorm_chunk` (K-norm eviction after every prefill chunk, 10 %), or the
general form `POLICY:RATIO[:WHEN]` (e.g. `h2o:0.25:chunk`), or `SELECTOR@BUDGET` (query-aware sparse
decode over the full cache, e.g. `quest@2048`, `tokenselect@2048`; its roofline still counts the
whole live cache, so compare its ms/step with the dense row's); any name + `+fused` runs the same row with
q|k|v and gate|up fused into one matmul each (`models.llama.fuse_projections`; an A/B of decode's
per-step fixed cost; the fused weights are built once and kept beside the plain ones).

Per row: the warm-up call compiles (same shapes and new-token count: decode's loop length is
static), the second call is timed; the engine's own `prefill_s` / `decode_s` are used.

- prefill tok/s = batch * context / prefill_s; "% mm" = prefill FLOPs / prefill_s / the bf16
  matmul rate measured here. FLOPs are those of the dense computation: 2 * (parameters except
  the embedding and lm_head) per prompt token + the lm_head for the last position of each row +
  causal attention 4 * n_layers * n_heads * head_dim * sum over positions of the keys each query
  sees (T (T + 1) / 2 per row). Methods that evict during prefill (`knorm_chunk`) do less
  attention work than this count.
- decode ms/step = decode_s / (new_tokens - 1) (the first token comes from prefill). The roofline
  = (weight bytes incl. the lm_head, excl. the embedding table + live cache bytes at mid-decode) /
  the best copy bandwidth measured here (bytes read + written; a read-mostly decode can beat it a
  little). Live cache bytes = the cache's allocated bytes * (live tokens per head at mid-decode /
  slots per head); "x roof" = measured / roofline (1.0 is the floor).
- memory: `peak_bytes_in_use` of the device (the process-wide peak: XLA cannot reset it). Within a
  shape the methods run in order of expected peak (smallest first; `--keep-order` to disable), so
  a row's peak is its own when it rose during the row; otherwise it is printed as "<=" (a bound).
  Cache GB = the cache during decode, peak cache GB = the largest cache allocated (the engine's
  `cache_bytes` / `peak_cache_bytes`).

Ceilings, measured first: torch `copy_` of a 4 GiB bf16 tensor (CUDA events, median) when torch
imports and sees the GPU, XLA copies of 4 GiB (`a + 1` bf16 plain and donated, uint32 `a ^ 1`
donated); the best is the bandwidth. bf16 matmul rate: 8192^3 through jnp (chained in one jit) and
torch (CUDA events), the best is used. Torch's memory is released before JAX allocates its pool
(XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.90 here).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models.config import get_config  # noqa: E402

T_START = time.perf_counter()
GB = 1e9
# execution order within a shape: expected peak memory, smallest first (see the docstring)
FUSED = "+fused"   # method suffix: the same row with models.llama.fuse_projections' weights (A/B)
PEAK_ORDER = {"knorm_chunk": 0, "kivi2": 1, "kivi4": 2, "streaming10": 3, "snapkv10": 4, "dense": 5}


def elapsed() -> float:
    return time.perf_counter() - T_START


# ----------------------------------------------------------------------------------------------
# The engine adapter: every call into kvjax's generate API is here.
# ----------------------------------------------------------------------------------------------

def method_kwargs(method: str) -> dict:
    """generate() keyword arguments of a method name (see the module docstring)."""
    from kvjax.compression import Compression
    from kvjax.policies import Budget, make_policy
    from kvjax.quant import make_cache_init
    method = method.removesuffix(FUSED)
    fixed = {
        "dense": {},
        "kivi4": {"cache_init": make_cache_init("kivi4")},
        "kivi2": {"cache_init": make_cache_init("kivi2")},
        "snapkv10": {"compression": Compression(make_policy("snapkv"), Budget(ratio=0.1))},
        "streaming10": {"compression": Compression(make_policy("streaming_llm"), Budget(ratio=0.1))},
        "knorm_chunk": {"compression": Compression(make_policy("knorm"), Budget(ratio=0.1), when="chunk")},
    }
    if method in fixed:
        return fixed[method]
    if "@" in method:  # SELECTOR@BUDGET: query-aware sparse decode over the full cache (issue 17)
        from kvjax.selection import make_selection
        name, budget = method.split("@")
        return {"selection": make_selection(name, budget=int(budget))}
    parts = method.split(":")
    if len(parts) in (2, 3):  # POLICY:RATIO[:WHEN]
        when = parts[2] if len(parts) == 3 else "prefill"
        return {"compression": Compression(make_policy(parts[0]), Budget(ratio=float(parts[1])), when=when)}
    raise ValueError(f"unknown method {method!r}")


def run_engine(params, config, prompts, method: str, new_tokens: int, chunk: int) -> dict:
    """One generate call; returns the numbers the benchmark needs:
    prefill_s, decode_s, steps (decode steps), generated (tokens of row 0), cache_bytes,
    peak_cache_bytes, capacity (slots per head during decode) and live_end (mean live tokens per
    head after the last step; None when the result carries no cache)."""
    from kvjax.generate import generate
    res = generate(params, config, prompts, new_tokens, chunk_size=chunk, cache_dtype=jnp.bfloat16,
                   eos_ids=(), **method_kwargs(method))
    s = res.stats
    out = {"prefill_s": float(s["prefill_s"]), "decode_s": float(s["decode_s"]), "steps": new_tokens - 1,
           "generated": len(res.tokens[0]), "cache_bytes": int(s["cache_bytes"]),
           "peak_cache_bytes": int(s["peak_cache_bytes"]), "attention": str(s.get("attention", "")),
           "capacity": s.get("cache_capacity"), "live_end": None}
    cache = getattr(res, "cache", None)
    if cache is not None:
        out["capacity"] = int(cache.capacity)
        out["live_end"] = float(jnp.mean(jnp.sum(cache.positions >= 0, axis=-1, dtype=jnp.float32)))
    del res, cache
    return out


# ----------------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------------

def torch_ceilings(copy_bytes: int, n: int, reps: int = 30) -> dict:
    """torch copy_ bandwidth (bytes read + written) and bf16 matmul rate, CUDA events, medians."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        print(f"torch: not used ({type(e).__name__}: {e})", flush=True)
        return {}
    if not torch.cuda.is_available():
        print(f"torch {torch.__version__}: no CUDA device, not used", flush=True)
        return {}
    out = {"torch_version": torch.__version__}

    def med_events(fn, reps):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        return statistics.median(ts)

    with torch.inference_mode():
        src = torch.randn(copy_bytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        out["torch_copy_Bps"] = 2 * src.nbytes / med_events(lambda: dst.copy_(src), reps)
        del src, dst
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        c = torch.empty_like(a)
        out["torch_matmul_flops"] = 2 * n ** 3 / med_events(lambda: torch.matmul(a, b, out=c), reps)
        del a, b, c
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return out


def best_seconds(f, reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t0)
    return ts


def jax_ceilings(copy_bytes: int, n: int, reps: int = 15) -> dict:
    """XLA copy bandwidths (bytes read + written; medians) and the jnp bf16 matmul rate."""
    out = {}
    key = jax.random.PRNGKey(7)
    x = jax.random.normal(key, (copy_bytes // 2,), jnp.bfloat16)
    plain = jax.jit(lambda a: a + 1)
    jax.block_until_ready(plain(x))
    out["xla_copy_Bps"] = 2 * x.nbytes / statistics.median(best_seconds(lambda: plain(x), reps))
    donated = jax.jit(lambda a: a + 1, donate_argnums=0)
    box = [donated(x)]
    del x

    def step():
        box[0] = donated(box[0])
        return box[0]
    jax.block_until_ready(step())
    out["xla_copy_donated_Bps"] = 2 * copy_bytes / statistics.median(best_seconds(step, reps))
    del box
    w = jax.random.bits(key, (copy_bytes // 4,), jnp.uint32)
    xor = jax.jit(lambda a: a ^ 1, donate_argnums=0)
    wbox = [xor(w)]
    del w

    def wstep():
        wbox[0] = xor(wbox[0])
        return wbox[0]
    jax.block_until_ready(wstep())
    out["xla_xor_donated_Bps"] = 2 * copy_bytes / statistics.median(best_seconds(wstep, reps))
    del wbox
    # matmul: `chain` dependent products in one jit (launch overhead amortised), random data
    chain = 8
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
    mm = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda i, c: c @ b, a))
    jax.block_until_ready(mm(a, b))
    out["jnp_matmul_flops"] = 2 * n ** 3 * chain / statistics.median(best_seconds(lambda: mm(a, b), 7))
    del a, b
    return out


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------

def tree_size(tree) -> tuple[int, int]:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(int(x.size) for x in leaves), sum(int(x.size) * x.dtype.itemsize for x in leaves)


def model_counts(params, config) -> dict:
    """Parameters per prompt token (layers + final norm), the lm_head, and decode's weight bytes."""
    body_n, body_b = tree_size([params["layers"], params["final_norm"]])
    head = params["embed"] if config.tie_embeddings else params["lm_head"]
    head_n, head_b = tree_size(head)
    return {"body_params": body_n, "head_params": head_n, "weight_bytes": body_b + head_b,
            "all_params": tree_size(params)[0]}


def prefill_flops(counts, config, b: int, t: int) -> float:
    linear = 2 * counts["body_params"] * b * t + 2 * counts["head_params"] * b
    attn = 4 * config.n_layers * config.n_heads * config.head_dim * b * t * (t + 1) / 2
    return float(linear + attn)


def mem_stats() -> dict:
    try:
        return jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 (CPU backends may not report)
        return {}


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------

def bench_row(params, config, counts, ceil, b, t, method, a) -> dict:
    row = {"batch": b, "context": t, "method": method}
    rng = np.random.default_rng(1234 + b * 7 + t)
    prompts = [r.tolist() for r in rng.integers(0, config.vocab_size, (b, t), dtype=np.int64)]
    peak0 = mem_stats().get("peak_bytes_in_use")
    t0 = time.perf_counter()
    w = run_engine(params, config, prompts, method, a.new_tokens, a.chunk)  # warm-up: compiles
    t1 = time.perf_counter()
    print(f"  {b}x{t} {method} warm-up: prefill {w['prefill_s']:.1f} s, decode {w['decode_s']:.1f} s "
          f"(incl. compilation) ({elapsed():.0f} s)", flush=True)
    gc.collect()
    r = run_engine(params, config, prompts, method, a.new_tokens, a.chunk)
    t2 = time.perf_counter()
    row.update(r)
    row["warmup_call_s"] = t1 - t0
    row["timed_call_s"] = t2 - t1
    row["compile_s_est"] = (t1 - t0) - (t2 - t1)
    tokens = b * t
    flops = prefill_flops(counts, config, b, t)
    row["prefill_flops"] = flops
    row["prefill_tok_s"] = tokens / r["prefill_s"]
    row["prefill_tflops"] = flops / r["prefill_s"] / 1e12
    row["prefill_pct_matmul"] = 100 * flops / r["prefill_s"] / ceil["matmul_flops"]
    steps = max(r["steps"], 1)
    row["decode_ms_step"] = 1e3 * r["decode_s"] / steps
    row["decode_tok_s"] = b * steps / r["decode_s"]
    cap, live_end = r["capacity"], r["live_end"]
    if live_end is None:  # no cache in the result: the kept tokens + what decode appended
        comp = method_kwargs(method).get("compression")
        live_end = (comp.budget.kept(t) if comp is not None else t) + r["steps"]
    live_mid = max(live_end - r["steps"] / 2, 0.0)
    row["live_tokens_mid"] = live_mid
    row["live_cache_bytes_mid"] = r["cache_bytes"] * live_mid / cap if cap else float("nan")
    roof_bytes = counts["weight_bytes"] + row["live_cache_bytes_mid"]
    row["roofline_ms"] = 1e3 * roof_bytes / ceil["copy_Bps"]
    row["x_roofline"] = row["decode_ms_step"] / row["roofline_ms"]
    ms = mem_stats()
    row["peak_device_bytes"] = ms.get("peak_bytes_in_use")
    row["peak_rose"] = (peak0 is not None and row["peak_device_bytes"] is not None
                        and row["peak_device_bytes"] > peak0)
    return row


def fmt_row(row) -> str:
    if row.get("status") != "ok":
        return f"{row['batch']}x{row['context']} {row['method']}: {row['status']}"
    peak = row.get("peak_device_bytes")
    peak_s = "n/a" if peak is None else f"{'' if row['peak_rose'] else '<='}{peak / GB:.1f}"
    return (f"{row['batch']}x{row['context']} {row['method']}: prefill {row['prefill_s']:.2f} s "
            f"{row['prefill_tok_s']:.0f} tok/s {row['prefill_pct_matmul']:.1f}% mm; decode "
            f"{row['decode_ms_step']:.2f} ms/step (roof {row['roofline_ms']:.2f}, x{row['x_roofline']:.2f}); "
            f"cache {row['cache_bytes'] / GB:.2f} GB (peak {row['peak_cache_bytes'] / GB:.2f}); device peak "
            f"{peak_s} GB; compile ~{row['compile_s_est']:.0f} s; attention {row['attention']}")


def table(rows, ceil) -> str:
    lines = [f"\ncopy {ceil['copy_Bps'] / 1e12:.2f} TB/s, matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s "
             f"(best measured in this run)\n",
             "| batch x ctx | method | prefill s | prefill tok/s | % mm | decode ms/step | roofline ms | x roof "
             "| cache GB | peak cache GB | device peak GB | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['batch']}x{r['context']}"
        if r.get("status") != "ok":
            lines.append(f"| {shape} | {r['method']} | {r['status'][:80]} |" + " |" * 9)
            continue
        peak = r.get("peak_device_bytes")
        peak_s = "n/a" if peak is None else f"{'' if r['peak_rose'] else '<='}{peak / GB:.1f}"
        lines.append(f"| {shape} | {r['method']} | {r['prefill_s']:.2f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['prefill_pct_matmul']:.1f} | {r['decode_ms_step']:.2f} | {r['roofline_ms']:.2f} | "
                     f"{r['x_roofline']:.2f} | {r['cache_bytes'] / GB:.2f} | {r['peak_cache_bytes'] / GB:.2f} | "
                     f"{peak_s} | {r['compile_s_est']:.0f} |")
    return "\n".join(lines)


def tiny_config():
    """2 layers, d_model 128, 4 q-heads / 2 kv-heads of head_dim 64, small vocab (CPU smoke test)."""
    return dataclasses.replace(get_config("llama3-8b"), name="llama3-tiny", n_layers=2, d_model=128,
                               n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=256, vocab_size=1024)


def parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.lower().split("x")) for item in s.split(",") if item]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help="comma list of BATCHxCONTEXT (default 8x16384,8x32768; "
                    "--tiny: 2x256)")
    ap.add_argument("--methods", default="dense,kivi4,kivi2,snapkv10,streaming10,knorm_chunk",
                    help="comma list (see the module docstring; default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default 128; --tiny: 8)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default 4096; --tiny: 64)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock budget (s) from the start; rows predicted to end past it are skipped "
                    "(default 0: none)")
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "e2e.json") if os.environ.get("OUT") else None,
                    help="JSON of all rows (default $OUT/e2e.json when OUT is set)")
    ap.add_argument("--keep-order", action="store_true",
                    help="run methods in the given order (default: by expected peak memory, smallest first)")
    ap.add_argument("--skip-torch", action="store_true", help="no torch ceilings")
    ap.add_argument("--copy-gib", type=float, default=4.0, help="copy-ceiling buffer in GiB (default: %(default)s)")
    ap.add_argument("--mm", type=int, default=8192, help="matmul-ceiling size n, n x n x n (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers, d_model 128")
    ap.add_argument("--seed", type=int, default=0, help="parameter seed (default: %(default)s)")
    ap.add_argument("--traceback", action="store_true", help="print the traceback of a failed row (stderr)")
    ap.add_argument("--stack-every", type=float, default=0.0,
                    help="diagnosis: dump every thread's Python stack to stderr every S seconds (default 0: off)")
    ap.add_argument("--log-compiles", action="store_true", help="diagnosis: log each XLA compilation and its time")
    a = ap.parse_args()
    if a.stack_every > 0:
        import faulthandler
        faulthandler.dump_traceback_later(a.stack_every, repeat=True)
    if a.log_compiles:
        jax.config.update("jax_log_compiles", True)
    if a.tiny:
        config = tiny_config()
        a.shapes = a.shapes or "2x256"
        a.new_tokens = a.new_tokens or 8
        a.chunk = a.chunk or 64
        copy_bytes, mm_n = 16 * 2 ** 20, 256
    else:
        config = get_config("llama3-8b")
        a.shapes = a.shapes or "8x16384,8x32768"
        a.new_tokens = a.new_tokens or 128
        a.chunk = a.chunk or 4096
        copy_bytes, mm_n = int(a.copy_gib * 2 ** 30), a.mm
    shapes = parse_shapes(a.shapes)
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        method_kwargs(m)  # unknown names fail here, before anything runs
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}; model {config.name}; "
          f"shapes {a.shapes}; methods {','.join(methods)}; new tokens {a.new_tokens}; chunk {a.chunk}", flush=True)

    ceil = {} if a.skip_torch or a.tiny else torch_ceilings(copy_bytes, mm_n)
    ceil.update(jax_ceilings(copy_bytes, mm_n))
    ceil["copy_Bps"] = max(v for k, v in ceil.items() if k.endswith("_Bps"))
    ceil["matmul_flops"] = max(v for k, v in ceil.items() if k.endswith("_flops"))
    print("ceilings: " + ", ".join(f"{k} {v / 1e12:.3f} T" for k, v in ceil.items() if isinstance(v, float))
          + f" -> copy {ceil['copy_Bps'] / 1e12:.3f} TB/s, matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s "
          f"({elapsed():.0f} s)", flush=True)

    from models.llama import init_params
    # jitted: the bf16 leaves are drawn without float32 copies, so the device peak stays at the
    # weights (16 GB) and the rows' own peaks show above it
    params = jax.jit(init_params, static_argnames=("config", "dtype"))(config=config, key=jax.random.PRNGKey(a.seed),
                                                                        dtype=jnp.bfloat16)
    jax.block_until_ready(params)
    counts = model_counts(params, config)
    ms = mem_stats()
    print(f"params {counts['all_params'] / 1e9:.3f} B (per token {counts['body_params'] / 1e9:.3f} B, lm_head "
          f"{counts['head_params'] / 1e9:.3f} B); decode weight bytes {counts['weight_bytes'] / GB:.2f} GB; "
          f"in use {ms.get('bytes_in_use', 0) / GB:.1f} GB ({elapsed():.0f} s)", flush=True)

    meta = {"jax": jax.__version__, "device": dev.device_kind, "model": config.name, "new_tokens": a.new_tokens,
            "chunk": a.chunk, "ceilings": ceil, "counts": counts, "argv": sys.argv[1:]}
    rows: list[dict] = []

    def dump():
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)

    fused = None   # fused weights, built at the first "+fused" row
    prev_shape_max = None  # (tokens, seconds): the slowest row of the previous shape
    for b, t in shapes:
        order = methods if a.keep_order else sorted(methods, key=lambda m: PEAK_ORDER.get(m.removesuffix(FUSED), 3))
        shape_max = 0.0
        for method in order:
            # predicted row time: the slowest row so far at this shape, else the previous shape's
            # slowest scaled by tokens^1.5 (attention grows faster than linear)
            if shape_max:
                est = shape_max
            elif prev_shape_max:
                est = prev_shape_max[1] * (b * t / prev_shape_max[0]) ** 1.5
            else:
                est = 0.0
            if a.budget_s and elapsed() + est > a.budget_s:
                row = {"batch": b, "context": t, "method": method,
                       "status": f"skipped: budget ({elapsed():.0f} s + est. {est:.0f} s > {a.budget_s:.0f} s)"}
            else:
                t0 = time.perf_counter()
                try:
                    if method.endswith(FUSED) and fused is None:
                        from models.llama import fuse_projections, unstack_params
                        fused = fuse_projections(unstack_params(params))
                    row = bench_row(fused if method.endswith(FUSED) else params, config, counts, ceil, b, t,
                                    method, a)
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 (OOM or an engine error: one line, go on)
                    msg = " ".join(str(e).split())[:300]
                    row = {"batch": b, "context": t, "method": method, "status": f"error: {type(e).__name__}: {msg}"}
                    if a.traceback:
                        traceback.print_exc()
                gc.collect()
                row["row_s"] = time.perf_counter() - t0
                shape_max = max(shape_max, row["row_s"])
            rows.append(row)
            print(f"[{elapsed():5.0f} s] {fmt_row(row)}", flush=True)
            dump()
        if shape_max:
            prev_shape_max = (b * t, shape_max)
    # the table follows the order of --methods within each shape
    del fused
    rank = {m: i for i, m in enumerate(methods)}
    rows_sorted = sorted(rows, key=lambda r: (shapes.index((r["batch"], r["context"])), rank[r["method"]]))
    if a.out:
        print(f"\nJSON: {a.out}")
    print(table(rows_sorted, ceil))
    print(f"\ntotal {elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
