"""End-to-end check of the decode-kernel dispatch on the real SmolLM2 (run on a GPU).

    PYTHONPATH=. python benchmarks/generate_check.py [--max-new-tokens 48]

For a dense cache (batch 2, left-padded prompts of different lengths) and KIVI-4 / KIVI-2 caches
(group 32, residual 128), generates greedily with generate's `attention="auto"` (the Pallas kernels
on a GPU) and `attention="xla"` in one process, and prints per case: the attention path named in
generate's stats, decode tokens/s of both, and whether the token ids are equal (with the first
differing step if not).
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a short poem about the sea, with four lines and a rhyme in every second line."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=48)
    a = ap.parse_args()
    from kvjax.generate import generate
    from kvjax.quant.kivi import init_kivi_cache
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    config, params = load_model("smollm2", progress=False)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok = load_tokenizer("smollm2")
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}; prompt lengths {[len(i) for i in ids]}", flush=True)
    cases = {"dense-f32": None,
             "kivi4": functools.partial(init_kivi_cache, bits=4, group=32, residual=128),
             "kivi2": functools.partial(init_kivi_cache, bits=2, group=32, residual=128)}
    ok_all = True
    for name, ci in cases.items():
        res = {}
        for mode in ("auto", "xla"):
            # compile (max_new_tokens and attention are static in decode_loop: warm up with the same values)
            generate(params, config, ids, a.max_new_tokens, cache_init=ci, tokenizer=tok, attention=mode)
            r = generate(params, config, ids, a.max_new_tokens, cache_init=ci, tokenizer=tok, attention=mode)
            res[mode] = r
            print(f"{name:<10} {mode:<5} decode {r.stats['decode_tok_per_s']:8.1f} tok/s  attention: "
                  f"{r.stats['attention']}", flush=True)
        same = res["auto"].tokens == res["xla"].tokens
        ok_all &= same
        first = None
        if not same:
            for row, (x, y) in enumerate(zip(res["auto"].tokens, res["xla"].tokens)):
                d = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
                if d is not None or len(x) != len(y):
                    first = (row, d)
                    break
        print(f"{name:<10} tokens equal: {same}" + ("" if same else f" (first difference row, step {first})"))
        print(f"  kernel text[0]: {res['auto'].text[0][:160]!r}", flush=True)
    print("ALL EQUAL" if ok_all else "SOME DIFFER")


if __name__ == "__main__":
    main()
