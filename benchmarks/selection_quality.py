"""CPU quality of query-aware sparse decode on SmolLM2: teacher-forced continuation after a long
KJV context; KL(full || selected) and perplexity per decode step, and bytes read per step.

    PYTHONPATH=. python benchmarks/selection_quality.py --context 2048 --steps 32 --budgets 256,512,1024
    PYTHONPATH=. python benchmarks/selection_quality.py --methods shadowkv --append   # add rows
    PYTHONPATH=. python benchmarks/selection_quality.py --methods "" --policies dapq,triattention --append
    PYTHONPATH=. python benchmarks/selection_quality.py --methods louiskv,quest --policies treekv,snapkv --append
    PYTHONPATH=. python benchmarks/selection_quality.py --methods quest,louiskv --kv-quant kivi4 --append

A2ATS's query-aware metric and TriAttention's query statistics are calibrated on 512 tokens of Exodus (not the evaluated Genesis text).
"""
import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.compression import Compression
from kvjax.eval.text import kjv_text
from kvjax.policies import Budget, make_policy
from kvjax.generate import decode_loop, init_engine_cache, prefill
from kvjax.sampling import Sampling
from kvjax.selection import make_selection, read_bytes_per_step, wrap
from models.loading import load_model
from models.llama import unstack_params
from models.tokenizer import load_tokenizer


def quantized_copy(dense, config, cap, n_ctx, kv_quant):
    """(quantized engine cache holding the dense cache's first n_ctx tokens, the dense cache)."""
    from kvjax.quant import make_cache_init
    q = init_engine_cache(config, 1, cap, jnp.float32, make_cache_init(kv_quant))
    store = jax.jit(lambda t, d: t.append(d.keys[..., :n_ctx, :], d.values[..., :n_ctx, :], d.positions[:, 0, :n_ctx]))
    layers = tuple(store(t, d) for t, d in zip(q.layers, dense.layers))
    return dataclasses.replace(q, layers=layers), dense


def run(params, config, ids, n_ctx, steps, selection, policy=None, budget=0, when="prefill", chunk=512,
        kv_quant=None):
    """selection: a query-aware selector over the full cache; policy: an eviction policy run once
    at the end of the prefill down to `budget` tokens per head (when="chunk": after every prefill
    chunk of `chunk` tokens, a fixed-size cache through the prefill), then decode appends.
    kv_quant: a quantized cache name (kivi4): the prompt prefilled in full precision, then stored in
    that cache; a selector's metadata is built from the full-precision keys (`wrap(..., source=)`)."""
    tokens = jnp.asarray(ids[:n_ctx])[None]
    cap = -(-(n_ctx + steps) // 16) * 16
    cache = init_engine_cache(config, 1, cap, jnp.float32)
    pos = jnp.arange(n_ctx, dtype=jnp.int32)[None]
    if policy is None:
        last, cache, _ = prefill(params, config, tokens, pos, cache, 512)
    else:
        comp = Compression(policy, Budget(tokens=budget), when=when)
        # accumulating policies (H2O, TreeKV) carry their running score through the prefill chunks
        state = jnp.zeros((config.n_layers, 1, config.n_kv_heads, cap), jnp.float32) if policy.accumulates else None
        last, cache, _ = prefill(params, config, tokens, pos, cache, chunk, compression=comp,
                                 n_keep=jnp.asarray([budget], jnp.int32), max_keep=budget, state=state)
        cache = cache.resize(budget + steps)
    if kv_quant is not None:      # the prompt's full-precision K/V quantized into the cache (KIVI's prefill
        cache = quantized_copy(cache, config, cap, n_ctx, kv_quant)      # rule); metadata from the fp keys
        if selection is not None:
            cache = jax.jit(wrap, static_argnums=(0, 2))(selection, cache[0], config, cache[1])
        else:
            cache = cache[0]
    forced = jnp.asarray(ids[n_ctx:n_ctx + steps])[None]
    kw = {"selection": selection} if selection is not None else {}
    _, _, cache, _, logp = decode_loop(params, cache, forced[:, 0], jnp.asarray([n_ctx], jnp.int32),
                                       jax.random.PRNGKey(0), None, None, forced[:, 1:], config=config,
                                       sampling=Sampling(), max_new_tokens=steps, eos_ids=(), **kw)
    return np.asarray(logp[0], np.float64), cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--methods", default="quest,tokenselect")
    ap.add_argument("--policies", default="", help="eviction policies (e.g. dapq,triattention): rows "
                    "'policy:NAME', evicted once after the prefill to the budget")
    ap.add_argument("--policy-when", default="prefill", choices=("prefill", "chunk"),
                    help="evict once after the prefill, or after every prefill chunk (rows 'policy:NAME@chunkN')")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk of the --policies runs")
    ap.add_argument("--kv-quant", default=None, help="selection over a quantized cache (kivi4): rows 'METHOD+kivi4' "
                    "and 'full+kivi4' (no selection)")
    ap.add_argument("--out", default="docs/selection_quality.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of --out for other methods / budgets (same context and steps)")
    a = ap.parse_args()
    old = []
    if a.append and a.out and os.path.exists(a.out):
        with open(a.out) as f:
            prev = json.load(f)
        if (prev["context"], prev["steps"]) != (a.context, a.steps):
            raise SystemExit(f"--append: {a.out} holds context {prev['context']} / {prev['steps']} steps")
        old = [r for r in prev["rows"] if r["method"] != "full"]
    config, params = load_model("smollm2", dtype=jnp.float32)
    params = unstack_params(jax.tree_util.tree_map(jnp.asarray, params))
    ids = load_tokenizer("smollm2").encode(kjv_text(book="Genesis", n_chars=a.context * 6))
    assert len(ids) >= a.context + a.steps, len(ids)
    targets = np.asarray(ids[a.context + 1:a.context + a.steps])
    full, _ = run(params, config, ids, a.context, a.steps, None)
    ppl = lambda lp: float(np.exp(-lp[np.arange(len(targets)), targets].mean()))
    rows = [{"method": "full", "budget": a.context, "kl": 0.0, "ppl": ppl(full), "read_ratio": 1.0}]
    print(rows[-1], flush=True)
    for m in [x for x in a.policies.split(",") if x]:
        extra = {}
        if m == "triattention":
            from kvjax.policies.triattention import calibrate_triattention
            calib = load_tokenizer("smollm2").encode(kjv_text(book="Exodus", n_chars=4096))[:512]
            extra = {"stats": calibrate_triattention(params, config, jnp.asarray([calib]))}
        for b in (int(x) for x in a.budgets.split(",")):
            lp, cache = run(params, config, ids, a.context, a.steps, None, make_policy(m, **extra), b,
                            a.policy_when, a.chunk)
            kl = float(np.mean(np.sum(np.exp(full) * (full - lp), axis=-1)))
            tag = "" if (a.policy_when, a.chunk) == ("prefill", 512) else f"@{a.policy_when}{a.chunk}"
            rows.append({"method": f"policy:{m}{tag}", "budget": b, "kl": kl, "ppl": ppl(lp),
                         "read_ratio": (b + a.steps) / (a.context + a.steps), "cache_bytes": cache.memory_bytes()})
            print(rows[-1], flush=True)
            save(a, old, rows)
    if a.kv_quant:
        lp, cache = run(params, config, ids, a.context, a.steps, None, kv_quant=a.kv_quant)
        rows.append({"method": f"full+{a.kv_quant}", "budget": a.context,
                     "kl": float(np.mean(np.sum(np.exp(full) * (full - lp), axis=-1))), "ppl": ppl(lp),
                     "read_ratio": read_ratio(cache, config), "cache_bytes": cache.memory_bytes()})
        print(rows[-1], flush=True)
    for m in [x for x in a.methods.split(",") if x]:
        extra = {}
        if m == "a2ats":
            from kvjax.selection.a2ats import calibrate_query_metric
            calib = load_tokenizer("smollm2").encode(kjv_text(book="Exodus", n_chars=4096))[:512]
            extra = {"metric": calibrate_query_metric(params, config, jnp.asarray([calib]))}
        for b in (int(x) for x in a.budgets.split(",")):
            lp, cache = run(params, config, ids, a.context, a.steps, make_selection(m, budget=b, **extra),
                            kv_quant=a.kv_quant)
            kl = float(np.mean(np.sum(np.exp(full) * (full - lp), axis=-1)))
            rows.append({"method": m + (f"+{a.kv_quant}" if a.kv_quant else ""), "budget": b, "kl": kl, "ppl": ppl(lp),
                         "read_ratio": read_ratio(cache, config),
                         "cache_bytes": cache.memory_bytes()})
            print(rows[-1], flush=True)
            save(a, old, rows)


def read_ratio(cache, config):
    """Bytes a decode step reads / the full float32 cache's (a quantized cache: its selected codes,
    stats and residual per slot, against the float32 dense read, so rows compare)."""
    rb = read_bytes_per_step(cache)
    cap = cache.layers[0].capacity
    fp32 = config.n_layers * config.n_kv_heads * cap * 2 * config.head_dim * 4
    return rb["selected"] / fp32


def save(a, old, rows):
    """Write the rows (the full-cache row first, then the kept old rows, then the new ones)."""
    if a.out:
        new = {(r["method"], r["budget"]) for r in rows}
        kept = [r for r in old if (r["method"], r["budget"]) not in new]
        with open(a.out, "w") as f:
            json.dump({"context": a.context, "steps": a.steps, "rows": rows[:1] + kept + rows[1:]}, f, indent=1)


if __name__ == "__main__":
    main()
