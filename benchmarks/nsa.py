"""NSA selected-block attention (pallas_kernels.{gpu,tpu}.nsa_select[_bwd]) vs dense causal attention,
forward and forward+backward.

    PYTHONPATH=. python3 benchmarks/nsa.py              # H200: Llama-3-8B attention shapes, 16K-64K
    PYTHONPATH=. python3 benchmarks/nsa.py --tiny       # CPU smoke (interpret mode, tiny shapes; = --smoke)
    PYTHONPATH=. python3 benchmarks/nsa.py --hq 24 --hkv 8    # GQA 3 (SmolLM2's group)

Shapes: batch 1, 32 q / 8 kv heads, head_dim 128, bf16; NSA defaults (block 64, top-16 blocks per
token and kv head, distinct, the query's own block included). The selection is shared by the
`--corr` (64) consecutive tokens of a tile (neighbouring queries pick the same blocks, as in
trained NSA; --corr 1 = independent random picks per token, the worst case for the block-outer
dK/dV kernel, which then visits almost every query tile).
Measured in the same run: the selection kernel forward (token-outer; on GPU also FSA's
block-outer `nsa_select_fsa.nsa_select_block_outer` and its relative difference to the
token-outer output) and forward+backward
(custom_vjp: dq token-outer + dK/dV block-outer), jax.nn.dot_product_attention (causal; cuDNN
where available, else XLA) forward and forward+backward, torch SDPA (causal, cuDNN/flash, if
torch+CUDA are present) forward and forward+backward, and the torch `copy_` bandwidth; on GPU
also the compressed branch with its selection importance (`nsa_compress.nsa_compressed`). The
sliding window is not in this script.
Prints a row per length and rewrites $OUT/nsa.json (or ./nsa_bench.json) after every row.
Ratios: dense / nsa (> 1: NSA faster).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np


def timeit(fn, *args, reps=5):
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps * 1e3


def torch_rows(T, hq, hkv, d):
    try:
        import torch
        if not torch.cuda.is_available():
            return {}
    except ImportError:
        return {}
    q = torch.randn(1, hq, T, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, T, d, device="cuda", dtype=torch.bfloat16).repeat_interleave(hq // hkv, 1)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    do = torch.randn_like(q)
    fb = lambda: torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qg, kg, kg, is_causal=True),
                                     (qg, kg), do)

    def ms(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5 * 1e3
    sdpa, sdpa_fb = ms(f), ms(fb)
    a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (time.perf_counter() - t0) / 1e9
    return {"torch_sdpa_ms": sdpa, "torch_sdpa_fwdbwd_ms": sdpa_fb, "copy_GBps": bw}


def selection(T, hkv, n, block, rng, corr):
    """Per token min(n, own block + 1) distinct blocks <= its own: pick k (k < n) is a random block
    of the k-th of n equal slices of [0, own block], the last pick is the own block; the random
    offsets are shared by `corr` consecutive tokens."""
    cur = (np.arange(T) // block)[None, None, :, None]
    k = np.arange(n)[None, None, None, :]
    lo, hi = k * (cur + 1) // n, (k + 1) * (cur + 1) // n
    u = rng.random((1, hkv, -(-T // corr), n)).repeat(corr, axis=2)[:, :, :T]
    idx = np.minimum(lo + (u * (hi - lo)).astype(np.int64), hi - 1)
    idx[..., -1] = cur[..., 0]
    small = (cur + 1 < n)[..., 0]                             # fewer blocks than n: all of them
    idx = np.where(small[..., None], np.where(k <= cur, k, -1), idx)
    counts = np.minimum(cur[..., 0] + 1, n).repeat(hkv, axis=1)
    return jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32)


def dense_rows(qt, kt, vt, impl):
    """jax.nn.dot_product_attention (causal) forward and forward+backward [B, T, H, D]."""
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    do = jnp.ones_like(qt)
    fb = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](do))
    return {"jax_dpa_ms": timeit(jax.jit(f), qt, kt, vt), "jax_dpa_fwdbwd_ms": timeit(fb, qt, kt, vt)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", "--smoke", action="store_true")
    ap.add_argument("--hq", type=int, default=32, help="query heads (GQA group = hq / hkv)")
    ap.add_argument("--hkv", type=int, default=8, help="kv heads")
    ap.add_argument("--lengths", default="16384,32768,65536")
    ap.add_argument("--corr", type=int, default=64, help="consecutive tokens sharing one selection")
    a = ap.parse_args()
    if a.tiny:
        lengths, hq, hkv, d, block, n, dtype = [64, 96], 4, 2, 16, 16, 3, jnp.float32
    else:
        lengths, hq, hkv, d, block, n, dtype = ([int(x) for x in a.lengths.split(",")], a.hq, a.hkv, 128, 64, 16,
                                                jnp.bfloat16)
    backend = jax.default_backend()
    if backend == "tpu":
        from pallas_kernels.tpu.nsa_select import nsa_select
        from pallas_kernels.tpu.nsa_select_bwd import nsa_select_trainable
    else:
        from pallas_kernels.gpu.nsa_select import nsa_select
        from pallas_kernels.gpu.nsa_select_bwd import nsa_select_trainable
    interpret = backend == "cpu"
    out_path = pathlib.Path(os.environ.get("OUT", ".")) / ("nsa.json" if "OUT" in os.environ else "nsa_bench.json")
    rows = []
    rng = np.random.default_rng(0)
    for T in lengths:
        key = jax.random.PRNGKey(T)
        q = jax.random.normal(key, (1, hq, T, d), dtype)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, hkv, T, d), dtype)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, hkv, T, d), dtype)
        idx, cnt = selection(T, hkv, n, block, rng, a.corr)
        reps = 1 if a.tiny else 5
        sel = jax.jit(lambda q, k, v, i, c: nsa_select(q, k, v, i, c, block_size=block, interpret=interpret))
        row = {"T": T, "hq": hq, "hkv": hkv, "backend": backend, "corr": a.corr,
               "nsa_select_ms": timeit(sel, q, k, v, idx, cnt, reps=reps)}
        if backend != "tpu":      # FSA's block-outer forward (GPU kernel)
            from pallas_kernels.gpu.nsa_select_fsa import nsa_select_block_outer
            bo = jax.jit(lambda q, k, v, i, c: nsa_select_block_outer(q, k, v, i, c, block_size=block,
                                                                      interpret=interpret))
            row["nsa_select_block_outer_ms"] = timeit(bo, q, k, v, idx, cnt, reps=reps)
            ref, got = (np.asarray(f(q, k, v, idx, cnt), np.float32) for f in (sel, bo))
            row["block_outer_rel_diff"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            row["token_over_block_outer"] = row["nsa_select_ms"] / row["nsa_select_block_outer_ms"]
            # the compressed branch (output + selection importance, nsa_compress) over T/16 - 1 keys
            from pallas_kernels.gpu.nsa_compress import nsa_compressed
            l, st = (8, 4) if a.tiny else (32, 16)
            nc = (T - l) // st + 1
            ck, cv = (jax.random.normal(jax.random.fold_in(key, 5 + i), (1, hkv, nc, d), dtype) for i in range(2))
            kw = dict(kernel_size=l, kernel_stride=st, block_size=block, interpret=interpret)
            if a.tiny:
                kw.update(block_q=16, blocks_per_tile=1)
            cmp = jax.jit(lambda q, ck, cv: nsa_compressed(q, ck, cv, **kw))
            row["nsa_compressed_ms"] = timeit(cmp, q, ck, cv, reps=reps)
        do = jax.random.normal(jax.random.fold_in(key, 3), q.shape, dtype)
        sel_fb = jax.jit(lambda q, k, v, i, c: jax.vjp(
            lambda q, k, v: nsa_select_trainable(q, k, v, i, c, block, None, 64, interpret), q, k, v)[1](do))
        row["nsa_select_fwdbwd_ms"] = timeit(sel_fb, q, k, v, idx, cnt, reps=reps)
        print(json.dumps(row), flush=True)
        # dense reference: [B, T, H, D] layout of jax.nn.dot_product_attention
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        impl = "cudnn" if backend == "gpu" else None
        try:
            row.update(dense_rows(qt, kt, vt, impl))
            row["jax_dpa_impl"] = impl or "xla"
        except Exception as e:  # cuDNN unavailable for this shape/dtype: XLA
            row.update(dense_rows(qt, kt, vt, None))
            row["jax_dpa_impl"] = f"xla ({type(e).__name__})"
        row.update(torch_rows(T, hq, hkv, d) if not a.tiny else {})
        row["dense_over_nsa_select"] = row["jax_dpa_ms"] / row["nsa_select_ms"]
        row["dense_over_nsa_select_fwdbwd"] = row["jax_dpa_fwdbwd_ms"] / row["nsa_select_fwdbwd_ms"]
        if "torch_sdpa_ms" in row:
            row["sdpa_over_nsa_select"] = row["torch_sdpa_ms"] / row["nsa_select_ms"]
            row["sdpa_over_nsa_select_fwdbwd"] = row["torch_sdpa_fwdbwd_ms"] / row["nsa_select_fwdbwd_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
