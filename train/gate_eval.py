"""Evaluate trained gates on SmolLM2 over held-out KJV text (CPU-sized): writes one JSON.

    python -m train.gate_eval --gated runs/gate --attention-gate runs/ag/gates --out docs/gates/results.json

- Gated Attention (`--gated`, an export of train.gated_attention): held-out next-token CE of the
  original vs the gated model (same windows), sink mass and largest activation of both
  (`train.gated_attention.attention_stats`), and KL to each model's own full cache of SnapKV and
  StreamingLLM without sinks at `--budget` (the engine: prefill + teacher-forced decode loop).
- Attention-Gate (`--attention-gate`): KL / ppl vs the full cache at `--budget` of the trained
  gate against SnapKV, H2O and StreamingLLM (sink + recent: the trivial baseline) on the original
  model, averaged over `--samples` consecutive held-out windows (per-window KL listed); `first_s` is
  the wall time of a policy's first window (its compile included).
- LoCoCo (`--lococo`, an export of train.lococo): KL / ppl vs the full cache on the chunk schedule
  (`--chunk` tokens per chunk, every policy at the compressor's `mem_size` tokens per head: equal
  cache bytes) for the trained compressor, its untrained start (train.lococo's seed-0 init), the same with lam = 0 (its own eviction by the last
  chunk's column sums, no fusion), H2O and SnapKV; SnapKV compressing once after prefill at the same
  budget is a reference (its peak memory is the whole context).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.gate_eval", description=__doc__.splitlines()[0])
    ap.add_argument("--gated")
    ap.add_argument("--attention-gate")
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--continuation", type=int, default=24)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4, help="held-out windows of the --attention-gate rows")
    ap.add_argument("--lococo")
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk of the --lococo rows")
    a = ap.parse_args(argv)
    from kvjax.compression import Compression
    from kvjax.eval.fidelity import evaluate_fidelity
    from kvjax.policies import Budget, make_policy
    from models.gated_attention import convert
    from models.llama import unstack_params
    from models.loading import load_model
    from train.data import corpus_tokens
    from train.gated_attention import attention_stats, lm_logits, load_gates

    config, params = load_model("smollm2", progress=False)
    corpus = corpus_tokens("smollm2", "heldout", 0.9)
    n = a.context + a.continuation
    ctx, cont = list(corpus[:a.context]), list(corpus[a.context:n])
    budget = Budget(ratio=a.budget)
    results: dict = {"context": a.context, "continuation": a.continuation, "budget": a.budget}

    def fid(p, c, policy, comp=None, chunk=None):
        r = evaluate_fidelity(unstack_params(p), c, ctx, cont, comp or Compression(policy, budget), chunk_size=chunk)
        return {k: float(r[k]) for k in ("kl", "ppl", "ppl_full")} | {
            "cache_bytes": int(r["cache_bytes"]), "peak_cache_bytes": int(r["peak_cache_bytes"])}

    def ce(p, c):
        wins = [corpus[i * n:(i + 1) * n + 1] for i in range(a.windows)]
        out = []
        for w in wins:
            logits = lm_logits(p, jnp.asarray(w[:-1], jnp.int32)[None], c)[0]
            lp = jax.nn.log_softmax(logits, axis=-1)
            out.append(float(-jnp.take_along_axis(lp, jnp.asarray(w[1:], jnp.int32)[:, None], -1).mean()))
        return float(np.mean(out))

    policies = {"snapkv": lambda p, c: make_policy("snapkv"),
                "streaming_llm_no_sink": lambda p, c: make_policy("streaming_llm", n_sink=0)}
    if a.gated:
        kind, gates = load_gates(a.gated, config)
        gcfg, gparams = convert(params, config, kind, gates)
        for name, (p, c) in {"original": (params, config), "gated": (gparams, gcfg)}.items():
            row = {"heldout_ce": ce(p, c)}
            st = attention_stats(p, c, np.asarray(corpus[:256]))
            row.update(sink_mass=st["sink_mass"], max_activation=st["max_activation"])
            for pname, mk in policies.items():
                row[pname] = fid(p, c, mk(p, c))
            results[f"gated_attention/{name}"] = row
            print(name, json.dumps(row), flush=True)
    if a.attention_gate:
        results["samples"] = a.samples
        for pname, pol in {"attention_gate": make_policy("attention_gate", gates=a.attention_gate, params=params,
                                                         config=config),
                           "snapkv": make_policy("snapkv"), "h2o": make_policy("h2o"),
                           "streaming_llm": make_policy("streaming_llm")}.items():   # the trivial baseline
            rows = []
            for i in range(a.samples):
                t0 = time.perf_counter()
                w = corpus[i * n:(i + 1) * n]
                r = evaluate_fidelity(unstack_params(params), config, w[:a.context], w[a.context:],
                                      Compression(pol, budget))
                rows.append({k: float(r[k]) for k in ("kl", "ppl", "ppl_full")} | {
                    "cache_bytes": int(r["cache_bytes"]), "secs": time.perf_counter() - t0})
            results[f"eviction/{pname}"] = {k: float(np.mean([r[k] for r in rows])) for k in ("kl", "ppl", "ppl_full")} | {
                "kl_per_window": [r["kl"] for r in rows], "cache_bytes": rows[0]["cache_bytes"], "first_s": rows[0]["secs"]}
            print(pname, json.dumps(results[f"eviction/{pname}"]), flush=True)
    if a.lococo:
        from kvjax.policies.lococo import LoCoCo, init_compressor, load_compressor
        w, spec = load_compressor(a.lococo, config)
        lococo = LoCoCo.from_weights(w, spec)
        ablation = LoCoCo.from_weights({**w, "lam": 0 * w["lam"]}, spec)
        untrained = LoCoCo.from_weights(init_compressor(spec, jax.random.PRNGKey(0)), spec)   # train.lococo's start
        mem = Budget(tokens=lococo.mem_size)
        results["lococo"] = {"mem_size": lococo.mem_size, "chunk": a.chunk}
        rows = {"lococo": Compression(lococo, mem, "chunk"), "lococo_lam0": Compression(ablation, mem, "chunk"),
                "lococo_untrained": Compression(untrained, mem, "chunk"),
                "h2o": Compression(make_policy("h2o"), mem, "chunk"),
                "snapkv": Compression(make_policy("snapkv"), mem, "chunk"),
                "snapkv_after_prefill": Compression(make_policy("snapkv"), mem)}
        for name, comp in rows.items():
            results[f"chunk/{name}"] = fid(params, config, None, comp, a.chunk if comp.when == "chunk" else None)
            print(name, json.dumps(results[f"chunk/{name}"]), flush=True)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
