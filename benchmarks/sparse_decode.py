"""Decode step of query-aware sparse attention (selection + sparse kernel) vs dense decode, on
Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, bf16), with the ceilings of
the same run: torch `copy_` bandwidth, torch SDPA (cuDNN) and `jax.nn.dot_product_attention`.

Rows (one layer, batch B, context T): dense Pallas decode; Quest (page min/max scores + top pages
+ page-sparse kernel) at token budget `--budget`; TokenSelect (soft-vote scores over all keys +
top-k + token-sparse kernel); each row's time includes the selection. Prints each row and rewrites
$OUT/sparse_decode.json after each.

    PYTHONPATH=. python3 benchmarks/sparse_decode.py              # H200: 32K, 64K, 128K, batch 8
    PYTHONPATH=. python benchmarks/sparse_decode.py --tiny        # CPU smoke (XLA reference paths)
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.selection import Quest, TokenSelect
from kvjax.selection.base import wrap_layer
from models.config import ModelConfig


def bench(fn, *args, iters=20):
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def torch_ceilings(b, hq, hkv, t, d, iters):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {"torch": "absent"}
    if not torch.cuda.is_available():
        return {"torch": "no cuda"}
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(k)

    def timed(f):
        f()
        torch.cuda.synchronize()
        s = time.perf_counter()
        for _ in range(iters):
            f()
        torch.cuda.synchronize()
        return (time.perf_counter() - s) / iters

    copy_s = timed(lambda: dst.copy_(k))
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa_s = timed(lambda: F.scaled_dot_product_attention(q, kk, vv))
    except Exception as e:  # noqa: BLE001 -- report, do not hide
        sdpa_s = f"cudnn sdpa failed: {type(e).__name__}"
    return {"torch_copy_GBps": 2 * k.numel() * 2 / copy_s / 1e9, "torch_cudnn_sdpa_ms": sdpa_s * 1e3
            if isinstance(sdpa_s, float) else sdpa_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", default="32768,65536,131072")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    out_dir = os.environ.get("OUT", "/tmp")
    hq, hkv, d = 32, 8, 128
    b, contexts, iters, dtype = a.batch, [int(x) for x in a.contexts.split(",")], a.iters, jnp.bfloat16
    backend = "auto"
    if a.tiny:
        hq, hkv, d, b, contexts, iters, dtype = 4, 2, 64, 1, [512], 2, jnp.float32
        a.budget = 128
    cfg = ModelConfig(name="bench", vocab_size=8, d_model=hq * d, n_layers=1, n_heads=hq, n_kv_heads=hkv,
                      head_dim=d, ffn_dim=8)
    rows = []
    for t in contexts:
        key = jax.random.PRNGKey(t)
        k1, k2, k3 = jax.random.split(key, 3)
        kv = kvcache.KVCache(keys=jax.random.normal(k1, (b, hkv, t, d), dtype),
                             values=jax.random.normal(k2, (b, hkv, t, d), dtype),
                             positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, hkv, t)),
                             lengths=jnp.full((b, hkv), t, jnp.int32))
        q = jax.random.normal(k3, (b, hq, 1, d), dtype)
        qpos = jnp.full((b, 1), t, jnp.int32)
        kv_bytes = 2 * b * hkv * t * d * jnp.dtype(dtype).itemsize
        dense = jax.jit(lambda kv, q: kv.attend(q, qpos, observe=Observe(), backend=backend)[0])
        dense_s = bench(dense, kv, q, iters=iters)
        jdpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q.transpose(0, 2, 1, 3), jnp.repeat(k, hq // hkv, 1).transpose(0, 2, 1, 3),
            jnp.repeat(v, hq // hkv, 1).transpose(0, 2, 1, 3)))
        jdpa_s = bench(jdpa, q, kv.keys, kv.values, iters=iters)
        base = {"context": t, "batch": b, "kv_GiB": kv_bytes / 2**30, "dense_ms": dense_s * 1e3,
                "dense_GBps": kv_bytes / dense_s / 1e9, "jax_dpa_ms": jdpa_s * 1e3,
                **torch_ceilings(b, hq, hkv, t, d, iters)}
        for sel in (Quest(budget=a.budget, dense_layers=0), TokenSelect.from_budget(a.budget)):
            layer = jax.jit(wrap_layer, static_argnums=(0, 2))(sel, kv, cfg)
            step = jax.jit(lambda layer, q: layer.attend_and_update(q, qpos, observe=Observe(), backend=backend)[0])
            s = bench(step, layer, q, iters=iters)
            scores = jax.jit(lambda layer, q: sel.select(layer.meta, layer.kv, q, qpos))
            sel_s = bench(scores, layer, q, iters=iters)
            rows.append({**base, "method": type(sel).__name__, "budget": a.budget,
                         "step_ms": s * 1e3, "selection_ms": sel_s * 1e3, "speedup_vs_dense": dense_s / s,
                         "meta_MiB": layer.meta_bytes() / 2**20})
            print(json.dumps(rows[-1]), flush=True)
            with open(os.path.join(out_dir, "sparse_decode.json"), "w") as f:
                json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
