"""Locret (arXiv 2410.01805) vs SnapKV, H2O and StreamingLLM under chunked prefill, on held-out KJV.

    python -m train.locret_eval --heads runs/locret/heads --out docs/locret/eval.md

Every method prefills the same held-out prompts (train.data, split "heldout": continuation,
passkey and key-value examples) in chunks of `--chunk` tokens and ends the prompt with exactly
`k = budget * prompt_len` cache entries per (layer, kv-head):
- baselines: `kvjax.generate.prefill` with `Compression(policy, Budget(tokens=k), when="chunk")`
  (compressed after every chunk, the last one included);
- Locret: budget `k - n_local` after every evicting chunk, then the `n_local`-token tail (which
  holds the question) without eviction, so the final cache also holds k entries.
The response is then teacher-forced with no eviction. Reported, against the full cache:
KL(full || method) of the next-token distributions over the response, perplexity of the
continuation examples' responses, and the log-probability / teacher-forced accuracy of the
needle answers (passkey and key-value examples).
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.compression import Compression
from kvjax.generate import prefill
from kvjax.policies.base import Budget
from kvjax.policies.h2o import H2O
from kvjax.policies.locret import HeadSpec, Locret, init_heads, load_heads, locret_prefill
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.streaming_llm import StreamingLLM
from models.llama import forward
from train.data import DataConfig, make_dataset


@jax.jit
def _kl_nll(ref_logits, logits, targets):
    """[B, R, V] x2, targets [B, R] -> KL(ref || logits) [B, R], NLL [B, R], argmax hit [B, R]."""
    lp_ref = jax.nn.log_softmax(ref_logits, -1)
    lp = jax.nn.log_softmax(logits, -1)
    kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), -1)
    nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
    return kl, nll, jnp.argmax(lp, -1) == targets


def teacher_force(params, config, cache, last_logits, response, rerotated: bool, prompt_len: int):
    """Logits [B, R, V] predicting response[:, 0..R-1] after a (compressed) prefill."""
    b, r = response.shape
    cache = kvcache.resize(cache, int(jnp.max(cache.lengths)) + r)
    if rerotated:
        start = jnp.max(cache.positions, axis=(0, 2, 3)) + 1
    else:
        start = jnp.full((b,), prompt_len, jnp.int32)
    pos = (start[:, None] + jnp.arange(r - 1, dtype=jnp.int32)[None]).astype(jnp.int32)
    logits, _, _ = _fwd(params, response[:, :-1], pos, cache, config)
    return jnp.concatenate([last_logits[:, None], logits], axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def _fwd(params, tokens, pos, cache, config):
    return forward(params, tokens, pos, cache, config, all_logits=True)


def run_method(params, config, data, method, k, chunk, heads=None, n_local=32, stab_frac=0.25, batch=16):
    """Logits [N, R, V] of the response for one method at k kept entries (None = full cache)."""
    P = data["prompt"].shape[1]
    outs = []
    for s in range(0, len(data["prompt"]), batch):
        toks = jnp.asarray(data["prompt"][s:s + batch])
        resp = jnp.asarray(data["response"][s:s + batch])
        b = toks.shape[0]
        pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (b, P))
        if method == "full":
            cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, P, config.head_dim)
            last, cache, _ = prefill(params, config, toks, pos, cache, chunk)
            rerot = False
        elif method in ("locret", "locret_random"):
            B = k - n_local
            pol = Locret(budget=B, chunk=chunk, n_stabilizers=max(1, int(stab_frac * B)), n_local=n_local)
            h = heads if method == "locret" else init_heads(HeadSpec.for_model(config, heads["w1"].shape[-1]),
                                                             jax.random.PRNGKey(0))
            last, st = locret_prefill(params, config, h, toks, pol)
            cache, rerot = st.cache, True
        else:
            policy = {"snapkv": SnapKV(), "h2o": H2O(), "streaming_llm": StreamingLLM(rerotate=True)}[method]
            comp = Compression(policy, Budget(tokens=k), when="chunk")
            cap = min(P, k + chunk)
            cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, cap, config.head_dim)
            state = jnp.zeros(cache.positions.shape, jnp.float32) if policy.accumulates else None
            last, cache, _ = prefill(params, config, toks, pos, cache, chunk, compression=comp,
                                     n_keep=jnp.full((b,), k, jnp.int32), max_keep=k, state=state)
            rerot = policy.rerotate
        outs.append(np.asarray(teacher_force(params, config, cache, last, resp, rerot, P)))
    return np.concatenate(outs)


def evaluate(params, config, heads, data, budgets, chunk, methods, n_local=32, stab_frac=0.25, batch=16,
             log=print):
    P = data["prompt"].shape[1]
    full = run_method(params, config, data, "full", P, chunk, batch=batch)
    mask = data["response_mask"]
    cont = data["kind"] == 0
    needle = ~cont
    rows = []

    def summarize(name, ratio, logits, secs):
        kl, nll, hit = map(np.asarray, _kl_nll(jnp.asarray(full), jnp.asarray(logits), jnp.asarray(data["response"])))
        mc, mn = mask * cont[:, None], mask * needle[:, None]
        row = {"method": name, "budget": ratio,
               "kl": float((kl * mask).sum() / mask.sum()),
               "kl_continuation": float((kl * mc).sum() / max(mc.sum(), 1)),
               "kl_needle": float((kl * mn).sum() / max(mn.sum(), 1)),
               "ppl": float(np.exp((nll * mask)[cont].sum() / mask[cont].sum())) if cont.any() else float("nan"),
               "needle_logprob": float(-(nll * mask)[needle].sum(1).mean()) if needle.any() else float("nan"),
               "needle_acc": float(np.mean([hit[i][mask[i]].all() for i in np.where(needle)[0]]))
               if needle.any() else float("nan"),
               "seconds": secs}
        rows.append(row)
        log(json.dumps(row))

    summarize("full", 1.0, full, 0.0)
    for ratio in budgets:
        k = max(1, int(round(ratio * P)))
        for m in methods:
            t = time.perf_counter()
            logits = run_method(params, config, data, m, k, chunk, heads, n_local, stab_frac, batch)
            summarize(m, ratio, logits, time.perf_counter() - t)
    return rows


def to_markdown(rows, meta) -> str:
    lines = [f"| budget | method | KL all ↓ | KL continuation ↓ | KL needle ↓ | ppl (continuation) ↓ | "
             f"needle log-prob ↑ | needle acc ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = "100%" if r["method"] == "full" else f"{r['budget']:.0%}"
        lines.append(f"| {b} | {r['method']} | {r['kl']:.4f} | {r['kl_continuation']:.4f} | {r['kl_needle']:.4f} | "
                     f"{r['ppl']:.3f} | {r['needle_logprob']:.3f} | "
                     f"{r['needle_acc']:.3f} |")
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.locret_eval")
    ap.add_argument("--heads", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", required=True, help="markdown table path (a .json with the rows is written beside)")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--chunk", default="256", help="comma-separated chunk sizes (one table each)")
    ap.add_argument("--budgets", default="0.25,0.1,0.05")
    ap.add_argument("--methods", default="locret,locret_random,snapkv,h2o,streaming_llm")
    ap.add_argument("--n-local", type=int, default=32)
    ap.add_argument("--stab-frac", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokenizer", default="smollm2")
    a = ap.parse_args(argv)
    from models.loading import load_model
    config, params = load_model(a.model, progress=False)
    heads = load_heads(a.heads, config)
    data = make_dataset(DataConfig(prompt_len=a.prompt_len, response_len=a.response_len, tokenizer=a.tokenizer,
                                   seed=1234), "heldout", a.n)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text, dump = [], []
    for chunk in [int(c) for c in a.chunk.split(",")]:
        t0 = time.perf_counter()
        rows = evaluate(params, config, heads, data, [float(x) for x in a.budgets.split(",")], chunk,
                        a.methods.split(","), a.n_local, a.stab_frac, a.batch)
        meta = {"model": config.name, "heads": str(a.heads), "examples": f"{a.n} held-out KJV (kinds: "
            f"{np.bincount(data['kind'], minlength=3).tolist()} continuation/passkey/kv)",
            "prompt_len": a.prompt_len, "response_len": a.response_len, "chunk": chunk,
            "locret": f"n_local={a.n_local}, budget=k-n_local, n_stabilizers={a.stab_frac}*budget; "
                      f"locret_random = same loop with untrained (random-init) heads",
            "baselines": "SnapKV(window 64, kernel 5), H2O(recent 32), StreamingLLM(4 sinks, rerotate)",
            "backend": jax.default_backend(), "wall_s": round(time.perf_counter() - t0, 1)}
        text.append(f"### chunk {chunk}\n\n" + to_markdown(rows, meta))
        dump.append({"meta": meta, "rows": rows})
        out.write_text("\n".join(text))
        out.with_suffix(".json").write_text(json.dumps(dump, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
