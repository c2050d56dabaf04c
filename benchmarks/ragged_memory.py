"""Allocated KV-cache MiB after compression on the real SmolLM2 (CPU is fine; no decode).

    python benchmarks/ragged_memory.py [--context 1600] [--room 128] [--padded] [--kl]

For SnapKV (uniform), AdaKV (head-adaptive), PyramidKV (layer-wise), DuoAttention and
RazorAttention (retrieval pattern from `find_retrieval_heads`) at kept ratios 0.5 / 0.25 / 0.1 of a
KJV context: prefill once, compress as generate does, resize to the decode capacity (`--room` new
tokens per head) and print `memory_bytes()`. `--padded` turns the ragged layouts off (AdaKV /
PyramidKV padded to the largest head / layer: the layout before kvjax.packed / kvjax.layerwise).
`--kl` also prints the mean KL (nats/token) over the next 128 tokens for AdaKV and PyramidKV at 0.25.
"""
from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.compression import Compression, compress_cache
from kvjax.eval.text import kjv_text
from kvjax.generate import forward_jit, plan_cache
from kvjax.policies import AdaKV, DuoAttention, PyramidKV, RazorAttention, SnapKV
from kvjax.policies.base import Budget
from kvjax.policies.razor import find_retrieval_heads
from models.loading import load_model
from models.tokenizer import load_tokenizer

MIB = 2 ** 20


def compressed_cache(params, config, ctx, comp: Compression, room: int, forwards: dict):
    n = ctx.shape[1]
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    observe = comp.observe
    if observe not in forwards:
        cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
        forwards[observe] = forward_jit(params, ctx, pos, cache, config, observe)
    _, cache, obs = forwards[observe]
    plan = plan_cache(n, [n], room, None, comp)
    new, _ = compress_cache(comp.policy, config, cache, obs, jnp.asarray(plan.n_keep, jnp.int32),
                            plan.max_keep, plan.max_keep, None)
    return kvcache.resize(new, plan.decode_capacity)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=1600)
    ap.add_argument("--room", type=int, default=128)
    ap.add_argument("--padded", action="store_true")
    ap.add_argument("--kl", action="store_true")
    a = ap.parse_args()
    config, params = load_model("smollm2", progress=False)
    ids = load_tokenizer("smollm2").encode(kjv_text()[:20000])
    ctx = jnp.asarray([ids[:a.context]], jnp.int32)
    pattern, _, _ = find_retrieval_heads(params, config)
    full = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, a.context + a.room, config.head_dim)
    print(f"context {a.context} tokens, room {a.room}; retrieval kv heads {sum(map(sum, pattern))} of "
          f"{config.n_layers * config.n_kv_heads} (max per layer {max(map(sum, pattern))})")
    print(f"full cache: {full.memory_bytes() / MIB:.2f} MiB")
    forwards = {}
    for ratio in (0.5, 0.25, 0.1):
        n_keep = int(ratio * a.context)
        row = []
        for name, pol in [("snapkv", SnapKV()), ("adakv", AdaKV(kv_heads=config.n_kv_heads)),
                          ("pyramidkv", PyramidKV(n_layers=config.n_layers)),
                          ("duo", DuoAttention(pattern=pattern, sink=64, recent=n_keep - 64)),
                          ("razor", RazorAttention(pattern=pattern, sink=4, recent=n_keep - 4))]:
            if a.padded and hasattr(pol, "ragged"):
                pol = dataclasses.replace(pol, ragged=False)
            budget = Budget(tokens=n_keep) if name in ("duo", "razor") else Budget(ratio=ratio)
            c = compressed_cache(params, config, ctx, Compression(pol, budget), a.room, forwards)
            row.append(f"{name} {c.memory_bytes() / MIB:.2f}")
        print(f"ratio {ratio}: " + ", ".join(row) + " MiB")
    if a.kl:
        from kvjax.eval.fidelity import evaluate_fidelity
        cont = ids[a.context:a.context + 128]
        for pol in (AdaKV(kv_heads=config.n_kv_heads), PyramidKV(n_layers=config.n_layers)):
            for ragged in (True, False):
                m = evaluate_fidelity(params, config, ids[:a.context], cont,
                                      Compression(dataclasses.replace(pol, ragged=ragged), Budget(ratio=0.25)))
                print(f"KL {type(pol).__name__} ragged={ragged} @0.25: {m['kl']:.6f} nats/token, "
                      f"cache {m['cache_bytes'] / MIB:.2f} MiB")


if __name__ == "__main__":
    main()
