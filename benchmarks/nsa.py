"""NSA selected-block attention forward (pallas_kernels.{gpu,tpu}.nsa_select) vs dense causal attention.

    PYTHONPATH=. python3 benchmarks/nsa.py              # H200: Llama-3-8B attention shapes, 8K-64K
    PYTHONPATH=. python3 benchmarks/nsa.py --tiny       # CPU smoke (interpret mode, tiny shapes)

Shapes: batch 1, 32 q / 8 kv heads, head_dim 128, bf16; NSA defaults (block 64, top-16 blocks per
token and kv head: random distinct blocks <= the query's, the query's own block included).
Measured in the same run: the selection kernel (token-outer order), jax.nn.dot_product_attention
(causal; cuDNN where available, else XLA), torch SDPA (causal, if torch+CUDA are present) and the
torch `copy_` bandwidth. Only the selection branch is timed (the compressed branch and the
sliding window are not in this script). Prints a row per length and rewrites $OUT/nsa.json
(or ./nsa_bench.json) after every row. Ratios: dense / nsa (> 1: NSA faster).
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
    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    sdpa = (time.perf_counter() - t0) / 5 * 1e3
    a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (time.perf_counter() - t0) / 1e9
    return {"torch_sdpa_ms": sdpa, "copy_GBps": bw}


def selection(T, hkv, n, block, rng):
    """Per token: its own block plus n-1 random earlier-or-own blocks (repeats possible: the
    kernel's cost is the same), all n counted."""
    cur = (np.arange(T) // block)[None, None, :, None]
    idx = (rng.random((1, hkv, T, n)) * (cur + 1)).astype(np.int32)
    idx[..., 0] = cur[..., 0]
    return jnp.asarray(idx), jnp.full((1, hkv, T), n, jnp.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    a = ap.parse_args()
    if a.tiny:
        lengths, hq, hkv, d, block, n, dtype = [64, 96], 4, 2, 16, 16, 3, jnp.float32
    else:
        lengths, hq, hkv, d, block, n, dtype = [int(x) for x in a.lengths.split(",")], 32, 8, 128, 64, 16, jnp.bfloat16
    backend = jax.default_backend()
    if backend == "tpu":
        from pallas_kernels.tpu.nsa_select import nsa_select
    else:
        from pallas_kernels.gpu.nsa_select import nsa_select
    interpret = backend == "cpu"
    out_path = pathlib.Path(os.environ.get("OUT", ".")) / ("nsa.json" if "OUT" in os.environ else "nsa_bench.json")
    rows = []
    rng = np.random.default_rng(0)
    for T in lengths:
        key = jax.random.PRNGKey(T)
        q = jax.random.normal(key, (1, hq, T, d), dtype)
        k = jax.random.normal(jax.random.fold_in(key, 1), (1, hkv, T, d), dtype)
        v = jax.random.normal(jax.random.fold_in(key, 2), (1, hkv, T, d), dtype)
        idx, cnt = selection(T, hkv, n, block, rng)
        sel = jax.jit(lambda q, k, v, i, c: nsa_select(q, k, v, i, c, block_size=block, interpret=interpret))
        row = {"T": T, "backend": backend, "nsa_select_ms": timeit(sel, q, k, v, idx, cnt, reps=1 if a.tiny else 5)}
        # dense reference: [B, T, H, D] layout of jax.nn.dot_product_attention
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        impl = "cudnn" if backend == "gpu" else None
        try:
            dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl))
            row["jax_dpa_ms"] = timeit(dense, qt, kt, vt)
            row["jax_dpa_impl"] = impl or "xla"
        except Exception as e:  # cuDNN unavailable for this shape/dtype: XLA
            dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
            row["jax_dpa_ms"] = timeit(dense, qt, kt, vt)
            row["jax_dpa_impl"] = f"xla ({type(e).__name__})"
        row.update(torch_rows(T, hq, hkv, d) if not a.tiny else {})
        row["dense_over_nsa_select"] = row["jax_dpa_ms"] / row["nsa_select_ms"]
        if "torch_sdpa_ms" in row:
            row["sdpa_over_nsa_select"] = row["torch_sdpa_ms"] / row["nsa_select_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
