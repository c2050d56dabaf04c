"""Chunked-prefill attention benchmark (GPU): our Pallas flash_prefill vs cuDNN (JAX) and torch SDPA.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/prefill_attention.py 2>&1 | tee log
    PYTHONPATH=. python benchmarks/prefill_attention.py --configs 1x4096x32768 --tiles 128:64:8:3,128:128:8:2
    PYTHONPATH=. python benchmarks/prefill_attention.py --interpret      # CPU smoke test (tiny shapes)

Config BxTxS: batch B, a chunk of T new queries at the end of a cache of S live slots (starts 0,
lengths S: the chunk's keys are the last T slots, everything before is context), Llama-3-8B
attention (32 query heads, 8 kv heads, head_dim 128), bf16. Default set: 1x4096x4096 (plain
causal prefill), 1x4096x16384, 1x4096x32768, 8x4096x32768.

Rows per config:
* `ours` -- `pallas_kernels.gpu.flash_prefill` with its default tiles (and every `--tiles`
  point bq:bk:warps:stages as `ours[bq,bk,w,s]`).
* `cudnn` -- `jax.nn.dot_product_attention(implementation="cudnn")` on the equivalent plain
  problem, layout [B, T, heads, d] (transposed outside the timing). For S == T this is one causal
  call (is_causal=True). For S > T cuDNN through JAX has only the top-left-aligned causal mask
  (query i sees keys 0..i), not the chunk-at-the-end (bottom-right) one, so the equivalent is what
  one would run with it: a non-causal call over the S - T context keys plus a causal call over the
  chunk's own T keys, merged by their log-sum-exps (cuDNN's float32 softmax statistics through
  `jax._src.cudnn.fused_attention_stablehlo`; the public API rounds them to bf16); the context
  and chunk K/V are separate arrays made outside the timing.
* `torch_sdpa` -- `torch.nn.functional.scaled_dot_product_attention` (when torch imports and
  sees a GPU) on [B, heads, T, d] views of the same arrays (DLPack, no copy): is_causal with
  enable_gqa for S == T; for S > T the lower-right causal mask `causal_lower_right(T, S)` (with
  enable_gqa, else with the kv heads repeated outside the timing; the row name says which).

Before timing, every row is checked against `pallas_kernels.reference.flash_prefill` on a slice
(batch 0, the query heads of kv head 0, the last <= 1024 queries: the reference materialises the
logits); the relative L2 error ||out - ref|| / ||ref|| is printed.
Reported: us per call (median of 3 timings of `--reps` chained calls inside one jit; torch: CUDA
events over `--reps` calls), TFLOP/s counting causal FLOPs only (4 * B * Hq * d * sum over queries
of visible keys = 4 B Hq d (T (S - T) + T (T + 1) / 2)), and cuDNN's time over ours (> 1: ours faster).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

INTERPRET = "--interpret" in sys.argv
# leave GPU memory for torch (JAX would otherwise preallocate 75% of it)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import reference  # noqa: E402
from pallas_kernels.gpu.flash_prefill import flash_prefill  # noqa: E402

HQ, HKV, D = (4, 2, 32) if INTERPRET else (32, 8, 128)
DTYPE = jnp.bfloat16


def causal_flops(b, t, s):
    return 4 * b * HQ * D * (t * (s - t) + t * (t + 1) / 2)


def relerr(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def timed(fn, args, q, reps, trials=3):
    """Median seconds per call of fn(q, *args) over `reps` calls chained through q in one jit."""
    def chain(q, args):
        def body(i, q):
            out = fn(q, *args)
            return q + (out[..., :1, :].astype(jnp.float32).mean() * 1e-6).astype(q.dtype)
        return jax.lax.fori_loop(0, reps, body, q)

    f = jax.jit(chain)
    jax.block_until_ready(f(q, args))
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, args))
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- cuDNN

def _cudnn_call(q, k, v, causal, scale):
    """One cuDNN attention ([B, T, N, d] layout) -> (out, float32 log-sum-exp [B, N, T])."""
    impl = "xla" if INTERPRET else "cudnn"   # the CPU smoke test runs the same code through XLA
    if not INTERPRET:
        try:
            from jax._src.cudnn import fused_attention_stablehlo as fa
            return fa.dot_product_attention(q, k, v, scale=scale, return_residual=True,
                                            mask_type=fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK)
        except (ImportError, AttributeError, TypeError):
            pass  # public API below (its lse is rounded to bf16)
    out, lse = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=impl, return_residual=True)
    return out, jnp.transpose(lse.astype(jnp.float32), (0, 2, 1))


def cudnn_prefill(qt, kpre, vpre, kch, vch, scale):
    """Chunk-at-the-end causal attention with cuDNN: [B, T, Hq, d] queries over context K/V
    (kpre/vpre [B, S-T, Hkv, d], None when S == T) and the chunk's own K/V [B, T, Hkv, d]."""
    if kpre is None:
        if INTERPRET:
            return jax.nn.dot_product_attention(qt, kch, vch, scale=scale, is_causal=True, implementation="xla")
        return jax.nn.dot_product_attention(qt, kch, vch, scale=scale, is_causal=True, implementation="cudnn")
    o1, l1 = _cudnn_call(qt, kpre, vpre, False, scale)
    o2, l2 = _cudnn_call(qt, kch, vch, True, scale)
    m = jnp.maximum(l1, l2)
    w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)                        # [B, N, T]
    w1, w2 = (jnp.transpose(w / (w1 + w2), (0, 2, 1))[..., None] for w in (w1, w2))
    return (w1 * o1.astype(jnp.float32) + w2 * o2.astype(jnp.float32)).astype(qt.dtype)


# ----------------------------------------------------------------------------- torch

def torch_rows(q, k, v, t, s, reps):
    """[(name, seconds, output as numpy slice)] for torch SDPA, or [] without torch/GPU."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("  torch not importable: no torch rows", flush=True)
        return []
    dev = "cuda" if torch.cuda.is_available() else None
    if dev is None and not INTERPRET:
        print("  torch sees no GPU: no torch rows", flush=True)
        return []
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))          # [B, H, T|S, d], no copy
    g = HQ // HKV

    def run(fn):
        out = fn()
        if dev:
            torch.cuda.synchronize()
            ts = []
            for _ in range(3):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(reps):
                    fn()
                e1.record()
                torch.cuda.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3 / reps)
            sec = statistics.median(ts)
        else:
            t0 = time.perf_counter()
            fn()
            sec = time.perf_counter() - t0
        return sec, out

    rows = []
    with torch.inference_mode():
        if s == t:
            variants = [("torch_sdpa", lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                                             enable_gqa=True))]
        else:
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(t, s)
            variants = [("torch_sdpa_lower_right_gqa",
                         lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True))]
        for name, fn in variants:
            try:
                rows.append((name, *run(fn)))
            except Exception as e:  # noqa: BLE001  (CausalBias may not take enable_gqa)
                print(f"  {name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                if s != t:
                    rk, rv = tk.repeat_interleave(g, dim=1), tv.repeat_interleave(g, dim=1)
                    try:
                        rows.append(("torch_sdpa_lower_right_repkv",
                                     *run(lambda: F.scaled_dot_product_attention(tq, rk, rv, attn_mask=mask))))
                    except Exception as e2:  # noqa: BLE001
                        print(f"  torch_sdpa_lower_right_repkv failed: {type(e2).__name__}: {str(e2)[:200]}",
                              flush=True)
    return [(name, sec, np.asarray(out[:1, :g, -min(t, 1024):].float().cpu())) for name, sec, out in rows]


# ----------------------------------------------------------------------------- main

def bench_config(b, t, s, reps, tiles, skip):
    key = jax.random.split(jax.random.PRNGKey(b * 7 + t + s), 3)
    q = jax.random.normal(key[0], (b, HQ, t, D), jnp.float32).astype(DTYPE)
    k = jax.random.normal(key[1], (b, HKV, s, D), jnp.float32).astype(DTYPE)
    v = jax.random.normal(key[2], (b, HKV, s, D), jnp.float32).astype(DTYPE)
    starts = jnp.zeros((b, HKV), jnp.int32)
    lengths = jnp.full((b, HKV), s, jnp.int32)
    scale = D ** -0.5
    g, n = HQ // HKV, min(t, 1024)
    ref = np.asarray(jax.jit(reference.flash_prefill)(q[:1, :g, -n:], k[:1, :1], v[:1, :1], starts[:1, :1],
                                                      lengths[:1, :1]).astype(jnp.float32))
    flops = causal_flops(b, t, s)
    rows = []

    def add(name, sec, out_slice):
        err = relerr(out_slice, ref)
        rows.append((name, sec, err))
        print(f"  {name:<30} {sec * 1e6:11.1f} us  {flops / sec / 1e12:7.1f} TFLOP/s  rel.err {err:.2e}"
              f"{'' if err < 2e-2 else '  FAIL'}", flush=True)

    def slice_of(out):  # [B, Hq, T, d] -> the checked slice
        return np.asarray(out[:1, :g, -n:].astype(jnp.float32))

    points = [("ours", {})] + [(f"ours[{bq},{bk},{w},{st}]", dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st))
                               for bq, bk, w, st in tiles]
    for name, kw in points:
        def ours(q, k, v, st, ln, kw=kw):
            return flash_prefill(q, k, v, st, ln, interpret=INTERPRET, **kw)
        try:
            out = ours(q, k, v, starts, lengths)
            add(name, timed(ours, (k, v, starts, lengths), q, reps), slice_of(out))
        except Exception as e:  # noqa: BLE001  (keep the table going)
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    if "cudnn" not in skip:
        qt = jnp.transpose(q, (0, 2, 1, 3))
        kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
        parts = (kt[:, :s - t], vt[:, :s - t], kt[:, s - t:], vt[:, s - t:]) if s > t else (None, None, kt, vt)

        def cud(qt, *parts):
            return cudnn_prefill(qt, *parts, scale)
        try:
            out = jnp.transpose(cud(qt, *parts), (0, 2, 1, 3))
            add("cudnn" if s == t else "cudnn_context+chunk_merged", timed(cud, parts, qt, reps), slice_of(out))
        except Exception as e:  # noqa: BLE001
            print(f"  cudnn failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if "torch" not in skip:
        for name, sec, out in torch_rows(q, k, v, t, s, reps):
            add(name, sec, out)
    return flops, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None, help="BxTxS,... (default 1x4096x4096,1x4096x16384,"
                                                    "1x4096x32768,8x4096x32768)")
    ap.add_argument("--tiles", default="", help="extra tile points block_q:block_k:num_warps:num_stages,...")
    ap.add_argument("--reps", type=int, default=None, help="chained calls per timing (default 10; 1 interpreted)")
    ap.add_argument("--skip", default="", help="comma list of baselines to skip: cudnn,torch")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test: tiny shapes, interpret mode")
    a = ap.parse_args()
    configs = a.configs or ("1x32x32,2x32x80" if INTERPRET else "1x4096x4096,1x4096x16384,1x4096x32768,8x4096x32768")
    configs = [tuple(int(x) for x in c.split("x")) for c in configs.split(",")]
    tiles = [tuple(int(x) for x in p.split(":")) for p in a.tiles.split(",") if p]
    reps = a.reps or (1 if INTERPRET else 10)
    skip = set(filter(None, a.skip.split(",")))
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, heads {HQ}/{HKV}, head_dim {D}, "
          f"{jnp.dtype(DTYPE).name}{' (interpret mode)' if INTERPRET else ''}", flush=True)
    table = []
    for b, t, s in configs:
        if s < t:
            raise SystemExit(f"config {b}x{t}x{s}: the cache (S) must hold the chunk (T)")
        print(f"batch {b}, chunk {t}, cache {s}", flush=True)
        flops, rows = bench_config(b, t, s, reps, tiles, skip)
        table.append(((b, t, s), flops, rows))
    print("\n| batch | T | S | impl | us/call | TFLOP/s (causal) | cuDNN time / this | rel.err vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for (b, t, s), flops, rows in table:
        cud = next((sec for name, sec, _ in rows if name.startswith("cudnn")), None)
        for name, sec, err in rows:
            ratio = f"{cud / sec:.2f}" if cud else "-"
            print(f"| {b} | {t} | {s} | {name} | {sec * 1e6:.1f} | {flops / sec / 1e12:.1f} | {ratio} | {err:.1e} |")


if __name__ == "__main__":
    main()
