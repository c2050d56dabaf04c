"""Why do KIVI-2 and RotateKV-2 lose so much on SmolLM2? Ablations with simulated caches.

    python benchmarks/quant_quality_ablation.py [--what kivi rotatekv errors layers] [--out rows.jsonl]

Same text, model and "decode" protocol as `benchmarks/quant_quality.py` (1024 tokens prefilled in full
precision, the cache then quantized, tokens 1024..2303 teacher-forced in chunks of 16). The caches here
are *simulated* (fp storage, quantize->dequantize at attend time), with per-layer on/off switches as data
so one compile serves every per-layer variant:

* `SimKIVI`: the numerics of `kvjax.quant.kivi` (keys per channel over G-token groups in whole R-blocks,
  values per token beyond the R-token window, fp16 statistics; the row "K2V2" reproduces the packed
  cache's 9.9226), plus an optional attention sink: tokens at positions < `sink` kept exact **and
  excluded from their key group's min/max**.
* `SimPerToken`: RotateKV's per-token quantization of pre-RoPE keys (optionally Hadamard-rotated, as
  `kvjax.quant.rotatekv`) and of values, RoPE applied after dequantization, first `sink` positions exact.

`errors` prints quantization error statistics of the real prefill K/V per layer (no model runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from kvjax import cache as kvcache  # noqa: E402
from kvjax.generate import forward_jit  # noqa: E402
from kvjax.quant import rotatekv  # noqa: E402
from kvjax.quant.kvtuner import SimKIVICache, fake_quant  # noqa: E402
from kvjax.observation import Observe  # noqa: E402
from models.rope import apply_rope  # noqa: E402
from quant_quality import score_chunks  # noqa: E402

FP = 16  # "bits" value meaning: not quantized


def fq(x, bits, group, axis, keep=None):
    """`kvtuner.fake_quant` (fp16 stats, as kvjax.quant.packing; `keep` entries exact and out of
    their group's min/max) with bits = FP meaning not quantized (bits: traced scalar)."""
    return jnp.where(bits >= FP, x.astype(jnp.float32), fake_quant(x, bits, group, axis, keep))


@dataclasses.dataclass(frozen=True)
class SimKIVI(SimKIVICache):
    """`kvtuner.SimKIVICache` (KIVI numerics on a dense cache) with per-layer FP = off and `sink`
    first positions kept exact (left out of their groups' statistics)."""
    sink: int = 0

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        from kvjax.attention import attend
        g, r = self.group, self.residual
        k, v = self.dense.keys.astype(jnp.float32), self.dense.values.astype(jnp.float32)
        pos = self.dense.positions
        t = jnp.arange(self.capacity)
        n = self.dense.lengths[..., None]
        keep = ((pos >= 0) & (pos < self.sink))[..., None]
        kq = fq(k, self.k_bits, g, axis=-2, keep=keep)
        vq = fq(v, self.v_bits, g, axis=-1, keep=keep)
        k = jnp.where((t < (n // r) * r)[..., None], kq, k)
        v = jnp.where((t < n - r)[..., None], vq, v)
        return attend(q, k, v, pos, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(SimKIVI, data_fields=["dense", "k_bits", "v_bits"],
                                 meta_fields=["group", "residual", "sink"])


@dataclasses.dataclass(frozen=True)
class SimPerToken:
    """Dense cache of post-RoPE keys, written from per-token quantize->dequantized pre-RoPE keys."""
    dense: kvcache.KVCache
    k_bits: jax.Array
    v_bits: jax.Array
    rotate: bool = True
    sink: int = 4
    config: object = None

    lengths = property(lambda self: self.dense.lengths)
    positions = property(lambda self: self.dense.positions)
    capacity = property(lambda self: self.dense.capacity)

    def memory_bytes(self):
        return self.dense.memory_bytes()

    def append(self, keys, values, positions, keys_pre_rope=None):
        k, v = quant_per_token(keys_pre_rope, values, positions, self.k_bits, self.v_bits, self.rotate, self.sink)
        return dataclasses.replace(self, dense=kvcache.append(self.dense, apply_rope(k, positions, self.config),
                                                              v, positions))

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        from kvjax.attention import attend
        return attend(q, self.dense.keys, self.dense.values, self.dense.positions, query_positions, observe=observe, backend=backend)


jax.tree_util.register_dataclass(SimPerToken, data_fields=["dense", "k_bits", "v_bits"],
                                 meta_fields=["rotate", "sink", "config"])


def quant_per_token(k_pre, v, positions, k_bits, v_bits, rotate, sink):
    """k_pre, v [b, h, t, d]; positions [b, t]. RotateKV's storage round trip (head_group 1)."""
    d = k_pre.shape[-1]
    rot = (lambda x: rotatekv.fwht(x)) if rotate else (lambda x: x.astype(jnp.float32))
    kq = rot(fq(rot(k_pre), k_bits, d, axis=-1))
    vq = rot(fq(rot(v), v_bits, d, axis=-1))
    keep = ((positions >= 0) & (positions < sink))[:, None, :, None]
    return jnp.where(keep, k_pre, kq).astype(k_pre.dtype), jnp.where(keep, v, vq).astype(v.dtype)


def setup(n=2304, p=1024, c=16):
    from kvjax.eval.text import kjv_text
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    jax.config.update("jax_default_matmul_precision", "highest")
    config, params = load_model("smollm2", progress=False)
    tok = load_tokenizer("smollm2")
    ids = np.asarray(tok.encode(kjv_text(n_chars=8 * n))[:n], np.int32)
    dense = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
    logits, _, _ = forward_jit(params, jnp.asarray(ids[None]), jnp.arange(n, dtype=jnp.int32)[None], dense, config,
                               all_logits=True)
    ref = jax.nn.log_softmax(logits[0], axis=-1)
    targets = np.concatenate([ids[1:], [0]]).astype(np.int32)
    valid = np.arange(n) < n - 1
    ref_nll = -np.asarray(jnp.take_along_axis(ref, jnp.asarray(targets)[:, None], axis=-1))[:, 0]
    base = float(np.exp(ref_nll[p:n - 1].mean()))
    dp = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
    _, dp, obs = forward_jit(params, jnp.asarray(ids[None, :p]), jnp.arange(p, dtype=jnp.int32)[None], dp, config,
                             Observe(qkv=True))
    m = (n - p) // c
    sl = lambda a: jnp.asarray(a[p:]).reshape((m, c) + a.shape[1:])
    dec_in = (sl(ids), sl(np.arange(n, dtype=np.int32)), sl(targets), ref[p:].reshape(m, c, -1), sl(valid))
    return dict(config=config, params=params, ids=ids, base=base, dp=dp, obs=obs, dec_in=dec_in, n=n, p=p)


def evaluate(S, cache, name, rows):
    t0 = time.time()
    nll, kl, _ = score_chunks(S["params"], cache, *S["dec_in"], config=S["config"])
    k = S["n"] - 1 - S["p"]
    ppl, kl = float(np.exp(float(nll) / k)), float(kl) / k
    row = {"name": name, "ppl": ppl, "dppl": 100 * (ppl / S["base"] - 1), "kl": kl}
    rows.append(row)
    print(f"{name}: ppl {ppl:.4f} ({row['dppl']:+.2f}%) KL {kl:.4f}  [{time.time() - t0:.0f} s]", flush=True)
    return row


def layer_bits(L, on, bits):
    return jnp.asarray([bits if o else FP for o in on], jnp.int32)


def kivi_runs(S, rows, base=True, per_layer=False):
    L = S["config"].n_layers
    dp = S["dp"]

    def sim(kb, vb, g=32, r=128, sink=0):
        kb = jnp.full((L,), kb, jnp.int32) if np.isscalar(kb) else kb
        vb = jnp.full((L,), vb, jnp.int32) if np.isscalar(vb) else vb
        return SimKIVI(dp, kb, vb, g, r, sink)

    if base:
        kivi_base(S, rows, sim)
    if per_layer:
        for l in range(L):
            on = [i == l for i in range(L)]
            evaluate(S, sim(layer_bits(L, on, 2), layer_bits(L, on, 2)), f"KIVI K2V2 layer {l} only", rows)


def kivi_base(S, rows, sim):
    evaluate(S, sim(2, 2), "KIVI K2V2 G32 R128 (sim)", rows)
    evaluate(S, sim(2, FP), "KIVI K2 only (V fp) G32 R128", rows)
    evaluate(S, sim(FP, 2), "KIVI V2 only (K fp) G32 R128", rows)
    evaluate(S, sim(2, 4), "KIVI K2V4 G32 R128", rows)
    evaluate(S, sim(4, 2), "KIVI K4V2 G32 R128", rows)
    evaluate(S, sim(2, 2, 32, 32), "KIVI K2V2 G32 R32", rows)
    evaluate(S, sim(2, 2, 16, 128), "KIVI K2V2 G16 R128 (outside the spec: more stats)", rows)
    evaluate(S, sim(2, 2, 64, 128), "KIVI K2V2 G64 R128 (outside the spec)", rows)
    for sink in (1, 4):
        evaluate(S, sim(2, 2, sink=sink), f"KIVI K2V2 G32 R128 + {sink} fp sink token(s) (excluded from stats)", rows)
    evaluate(S, sim(4, 4), "KIVI K4V4 G32 R128 (sim)", rows)
    evaluate(S, sim(4, 4, sink=1), "KIVI K4V4 G32 R128 + 1 fp sink", rows)


def rot_runs(S, rows):
    L, config = S["config"].n_layers, S["config"]
    dp, p = S["dp"], S["p"]
    pos = dp.positions[:, :, 0, :p]
    k_pre = jax.vmap(lambda k, q: apply_rope(k, -q, config))(dp.keys[..., :p, :], pos)
    v = dp.values[..., :p, :]

    def sim(kb, vb, rotate=True, sink=4):
        kb, vb = jnp.full((L,), kb, jnp.int32), jnp.full((L,), vb, jnp.int32)
        c = SimPerToken(kvcache.init_cache(L, 1, config.n_kv_heads, S["n"], config.head_dim), kb, vb, rotate, sink,
                        config)
        return jax.jit(jax.vmap(lambda c, k, v, q: c.append(None, v, q, keys_pre_rope=k)))(c, k_pre, v, pos)

    evaluate(S, sim(2, 2), "RotateKV K2V2 (sim, 4 sinks)", rows)
    evaluate(S, sim(2, FP), "RotateKV K2 only (V fp)", rows)
    evaluate(S, sim(FP, 2), "RotateKV V2 only (K fp)", rows)
    evaluate(S, sim(2, 2, rotate=False), "per-token K2V2 without rotation (4 sinks)", rows)
    evaluate(S, sim(2, 2, sink=0), "RotateKV K2V2 without sinks", rows)
    evaluate(S, sim(4, 4), "RotateKV K4V4 (sim, 4 sinks)", rows)
    evaluate(S, sim(4, 2), "RotateKV K4V2 (4 sinks)", rows)


def layer_sensitivity(S, t=1024):
    """Per-layer KIVI-2 sensitivity (fake-quant protocol over the first `t` tokens, G32 R128): mean
    KL(full || quantized) when only layer l is at K2V2 / K2V8 / K8V2 and every other layer at 8 bits."""
    from kvjax.quant import kvtuner
    L = S["config"].n_layers
    kl = kvtuner.make_kl_fn(S["params"], S["config"], S["ids"][:t], 32, 128)
    out = {}
    for tag, (kb, vb) in {"K2V2": (2, 2), "K2V8": (2, 8), "K8V2": (8, 2)}.items():
        vals = []
        for l in range(L):
            k = np.full(L, 8, np.int32)
            v = np.full(L, 8, np.int32)
            k[l], v[l] = kb, vb
            vals.append(float(kl(jnp.asarray(k), jnp.asarray(v))))
        out[tag] = vals
        order = np.argsort(vals)[::-1]
        print(f"{tag} per-layer KL (others 8-bit): sum {sum(vals):.4f}; top layers "
              + ", ".join(f"{i}: {vals[i]:.4f}" for i in order[:6]), flush=True)
    k = np.full(L, 2, np.int32)
    out["all K2V2"] = float(kl(jnp.asarray(k), jnp.asarray(k)))
    print(f"all layers K2V2 (same protocol): KL {out['all K2V2']:.4f}", flush=True)
    return out


def errors(S):
    """Relative errors on the real prefill K/V (1024 tokens) per layer: keys (post-RoPE equivalent),
    values, and the attention-logit error q.(k_hat - k)/sqrt(d) relative to the logits' std."""
    config, dp, p, obs = S["config"], S["dp"], S["p"], S["obs"]
    d = config.head_dim
    pos = dp.positions[:, :, 0, :p]
    k_post = dp.keys[..., :p, :].astype(jnp.float32)               # [L, 1, H, p, d]
    k_pre = jax.vmap(lambda k, q: apply_rope(k, -q, config))(k_post, pos)
    v = dp.values[..., :p, :].astype(jnp.float32)
    q_pre = obs["q_pre"][..., :p, :]                                  # [L, 1, Hq, p, d]
    q_post = jax.vmap(lambda x, qq: apply_rope(x, qq, config))(q_pre, pos)
    grp = config.n_heads // config.n_kv_heads
    H = np.eye(d)
    Hn = np.asarray(rotatekv.fwht(jnp.asarray(H)))
    out = {"hadamard_orthonormal_max_err": float(np.abs(Hn @ Hn.T - np.eye(d)).max()),
           "hadamard_self_inverse_max_err": float(np.abs(Hn @ Hn - np.eye(d)).max()),
           "hadamard_is_pm1_over_sqrt_d": bool(np.allclose(np.abs(Hn) * np.sqrt(d), 1))}
    L = config.n_layers
    two = jnp.int32(2)
    kivi_k = fq(k_post, two, 32, axis=-2)                             # per channel over 32-token groups
    tok_k_pre = fq(k_pre, two, d, axis=-1)
    rot_k_pre = rotatekv.fwht(fq(rotatekv.fwht(k_pre), two, d, axis=-1))
    rope_back = lambda x: jax.vmap(lambda a, qq: apply_rope(a, qq, config))(x, pos)
    skip = (np.arange(p) >= 4)[:, None]                               # sinks excluded from the stats

    def rel(a, b):
        return float(jnp.sqrt(jnp.sum(jnp.where(skip, (a - b) ** 2, 0)) / jnp.sum(jnp.where(skip, b ** 2, 0))))

    def logit_err(khat):
        kk = jnp.repeat(k_post, grp, axis=2)
        kh = jnp.repeat(khat, grp, axis=2)
        s = jnp.einsum("lbhqd,lbhkd->lbhqk", q_post[..., -64:, :], kk) / np.sqrt(d)
        e = jnp.einsum("lbhqd,lbhkd->lbhqk", q_post[..., -64:, :], kh - kk) / np.sqrt(d)
        return np.asarray(jnp.sqrt(jnp.mean(e[..., 4:] ** 2, axis=(1, 2, 3, 4))) /
                          jnp.std(s[..., 4:], axis=(1, 2, 3, 4)))
    per = {"kivi2_key_rel": [rel(kivi_k[l], k_post[l]) for l in range(L)],
           "tok2_key_rel": [rel(rope_back(tok_k_pre)[l], k_post[l]) for l in range(L)],
           "rot2_key_rel": [rel(rope_back(rot_k_pre)[l], k_post[l]) for l in range(L)],
           "kivi2_val_rel": [rel(fq(v, two, 32, axis=-1)[l], v[l]) for l in range(L)],
           "rot2_val_rel": [rel(rotatekv.fwht(fq(rotatekv.fwht(v), two, d, axis=-1))[l], v[l]) for l in range(L)],
           "kivi2_logit_err": logit_err(kivi_k).tolist(),
           "tok2_logit_err": logit_err(rope_back(tok_k_pre)).tolist(),
           "rot2_logit_err": logit_err(rope_back(rot_k_pre)).tolist()}
    # the first token: how far outside the other tokens' per-channel range are its keys?
    k0 = k_post[..., 0, :]
    rest_lo, rest_hi = jnp.min(k_post[..., 1:32, :], -2), jnp.max(k_post[..., 1:32, :], -2)
    widen = (jnp.maximum(k0, rest_hi) - jnp.minimum(k0, rest_lo)) / (rest_hi - rest_lo)
    per["first_token_group0_range_widening_mean"] = np.asarray(jnp.mean(widen, axis=(1, 2, 3))).tolist()
    out.update(per)
    for key, val in per.items():
        arr = np.asarray(val)
        print(f"{key}: mean {arr.mean():.3f}  min {arr.min():.3f} (layer {arr.argmin()})  max {arr.max():.3f} "
              f"(layer {arr.argmax()})", flush=True)
    print({k: v for k, v in out.items() if k.startswith("hadamard")})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", nargs="*", default=["errors", "kivi", "rotatekv"])
    ap.add_argument("--out", default="/tmp/quant_ablation.jsonl")
    a = ap.parse_args(argv)
    S = setup()
    print(f"full-cache continuation ppl {S['base']:.4f}", flush=True)
    rows = []
    res = {}
    if "errors" in a.what:
        res["errors"] = errors(S)
    if "rotatekv" in a.what:
        rot_runs(S, rows)
    if "kivi" in a.what:
        kivi_runs(S, rows)
    if "layers" in a.what:
        res["layers"] = layer_sensitivity(S)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        if res:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
