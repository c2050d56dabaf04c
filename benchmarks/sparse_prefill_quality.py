"""CPU quality of block-sparse prefill on SmolLM2-135M: a KJV context prefilled in chunks through
`kvjax.sparse_prefill` methods (reference kernel), then a held continuation teacher-forced with
dense decode steps; KL(dense prefill || sparse prefill) of the next-token distributions and
perplexity, next to the density each method chose (listed / causal blocks, over layers, heads,
chunks).

    PYTHONPATH=. python benchmarks/sparse_prefill_quality.py --context 2048 --steps 32
    PYTHONPATH=. python benchmarks/sparse_prefill_quality.py --only sale,hyper    # re-run some methods, keep the other rows
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.eval.text import kjv_text
from kvjax.cache import init_cache
from kvjax.generate import decode_loop, forward_step
from kvjax.sampling import Sampling
from kvjax.sparse_prefill import check_sparse_prefill, make_sparse_prefill
from models.loading import load_model
from models.tokenizer import load_tokenizer

SETTINGS = (
    ("flexprefill", "block_sparse:flexprefill"),                                # gamma 0.9, tau 0.1, min 512
    ("flexprefill", "block_sparse:flexprefill:gamma=0.8,min_budget=256"),
    ("minference", "block_sparse:minference"),                                  # [vertical_and_slash, 1000, 6096]
    ("minference", "block_sparse:minference:vertical=30,slash=100"),            # the forced minimum
    ("minference", "block_sparse:minference:vertical=30,slash=100,vertical_form=blocks"),  # verticals as blocks
    ("a_shape", "block_sparse:a_shape"),                                        # init 128, local 1024
    ("a_shape", "block_sparse:a_shape:slash=512"),
    ("streaming", "block_sparse:streaming:pattern_file=docs/duo/pattern.json"),  # trained Duo heads, 64 + 256
    ("streaming", "block_sparse:streaming"),                                    # every head streaming
    ("sale", "block_sparse:sale"),                                              # tau 0.004, sink 64, local 128
    ("sale", "block_sparse:sale:tau=0.02"),
    ("hyper", "block_sparse:hyper"),                                            # min_seq_len 4096: exact at 2K
    ("hyper", "block_sparse:hyper:min_seq_len=512"),                          # + sink block (64 tokens)
    ("hyper", "block_sparse:hyper:min_seq_len=512,sink=0"),                   # the official selection, no sink
    ("hyper", "block_sparse:hyper:min_seq_len=256"),                          # sparser, + sink block
)


def run(params, config, ids, n_ctx, steps, chunk, method):
    tokens = jnp.asarray(ids[:n_ctx])[None]
    positions = jnp.arange(n_ctx, dtype=jnp.int32)[None]
    # a cache stacked over layers: the forward scans one layer body (CPU compile ~30x shorter than the
    # engine's unrolled per-layer loop; same attention code per layer)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, n_ctx + steps, config.head_dim, jnp.float32)
    listed = live = 0.0
    t0 = time.perf_counter()
    for s in range(0, n_ctx, chunk):
        logits, cache, outs = forward_step(params, tokens[:, s:s + chunk], positions[:, s:s + chunk], cache, config,
                                           prefill_attention=method)
        if method is not None:
            dens = np.asarray(outs["prefill_density"], np.float64)             # [L, B, Hkv, 2]
            listed, live = listed + dens[..., 0].sum(), live + dens[..., 1].sum()
    first = np.asarray(jax.nn.log_softmax(logits[0, -1]), np.float64)
    prefill_s = time.perf_counter() - t0
    forced = jnp.asarray(ids[n_ctx:n_ctx + steps])[None]
    _, _, _, _, logp = decode_loop(params, cache, forced[:, 0], jnp.asarray([n_ctx], jnp.int32), jax.random.PRNGKey(0),
                                   None, None, forced[:, 1:], config=config, sampling=Sampling(),
                                   max_new_tokens=steps, eos_ids=())
    lp = np.concatenate([first[None], np.asarray(logp[0], np.float64)], 0)     # [steps, vocab]
    return lp, (listed / live if live else 1.0), prefill_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", default="docs/sparse_prefill_quality.json")
    ap.add_argument("--only", default=None, help="comma-separated method names: run these, keep the file's other rows")
    a = ap.parse_args()
    only = None if a.only is None else set(a.only.split(","))
    kept = []
    if only is not None:
        with open(a.out) as f:
            kept = [r for r in json.load(f)["rows"] if r["method"] != "dense" and r["method"] not in only]
    config, params = load_model("smollm2", dtype=jnp.float32)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    ids = load_tokenizer("smollm2").encode(kjv_text(book="Genesis", n_chars=a.context * 6))
    assert len(ids) >= a.context + a.steps, len(ids)
    targets = np.asarray(ids[a.context:a.context + a.steps])                     # lp[t] predicts ids[ctx + t]
    full, _, _ = run(params, config, ids, a.context, a.steps, a.chunk, None)
    ppl = lambda lp: float(np.exp(-lp[np.arange(a.steps), targets].mean()))
    kl = lambda lp: np.sum(np.exp(full) * (full - lp), axis=-1)
    rows = [{"method": "dense", "setting": "dense prefill", "density": 1.0, "kl_first": 0.0, "kl_mean": 0.0,
             "ppl": ppl(full)}]
    print(rows[-1], flush=True)
    rows += kept
    for name, spec in SETTINGS:
        if only is not None and name not in only:
            continue
        method = make_sparse_prefill(spec)
        check_sparse_prefill(method, config)
        lp, density, secs = run(params, config, ids, a.context, a.steps, a.chunk, method)
        k = kl(lp)
        rows.append({"method": name, "setting": spec, "density": float(density), "kl_first": float(k[0]),
                     "kl_mean": float(k.mean()), "ppl": ppl(lp), "cpu_prefill_s_incl_compile": round(secs, 1)})
        print(rows[-1], flush=True)
        with open(a.out, "w") as f:
            json.dump({"model": "smollm2-135m (GGUF, float32, CPU)", "text": "KJV Genesis", "context": a.context,
                       "chunk": a.chunk, "steps": a.steps,
                       "kl": "KL(dense || sparse) of the next-token distribution, nats: kl_first after the prefill, "
                             "kl_mean over the first + steps-1 teacher-forced dense decode steps",
                       "density": "listed / causal (live) blocks summed over layers, kv heads and chunks",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
