"""Attention-Gate (kvjax/policies/attention_gate.py, train/attention_gate.py): the gate and the
flag-masked attention vs float64 numpy loops, the straight-through gradient vs central differences of
its surrogate, the deployed policy's scores vs numpy, training/export/reload in the engine, errors.
Spec §3 of eviction_merging_learned.md."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.observation import Frozen, Observation, Observe
from kvjax.policies.attention_gate import AttentionGate, GateSpec, init_gates, keep_logits, load_gates
from models.config import ModelConfig
from models.llama import forward, init_params, unstack_params
from train.attention_gate import GateTrainConfig, kept_attention, run, ste_flags
from train.loop import TrainConfig

TINY = ModelConfig(name="tiny-locret", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, ffn_dim=64, tie_embeddings=True)
TINY_FIELDS = (("d_model", 32), ("ffn_dim", 64), ("head_dim", 8), ("n_heads", 4), ("n_kv_heads", 2),
               ("n_layers", 2), ("scale", 0.3), ("vocab_size", 256))


def _np_gate(g, h, valid, heads):
    """float64: sigmoid of the bidirectional few-head attention over valid tokens -> [Hkv, T]."""
    g = {k: np.asarray(v, np.float64) for k, v in g.items()}
    t = h.shape[0]
    outs = []
    for n in range(heads):
        sl = slice(n * g["wq"].shape[1] // heads, (n + 1) * g["wq"].shape[1] // heads)
        q, k, v = h @ g["wq"][:, sl], h @ g["wk"][:, sl], h @ g["wv"][:, sl]
        s = q @ k.T / np.sqrt(q.shape[1])
        s[:, ~valid] = -np.inf
        e = np.exp(s - s.max(1, keepdims=True))
        outs.append(e / e.sum(1, keepdims=True) @ v)
    z = np.concatenate(outs, 1) @ g["wo"] + h @ g["wr"] + g["bo"]
    return (1 / (1 + np.exp(-z))).T


def _np_kept(q, k, v, keep, local, valid_slots, sink=0):
    """float64 loop: query t sees slot s <= t if keep[s], t - s < local or s < sink (GQA). q [Hq, T, d]."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    out = np.zeros_like(q)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(t):
            vis = [s for s in range(i + 1) if valid_slots[s] and (keep[kv, s] or i - s < local or s < sink)]
            if not vis:
                continue
            sc = np.array([q[h, i] @ k[kv, s] for s in vis]) / np.sqrt(d)
            p = np.exp(sc - sc.max())
            out[h, i] = (p / p.sum()) @ v[kv, vis]
    return out


def test_gate_and_kept_attention_match_float64():
    rng = np.random.default_rng(0)
    spec = GateSpec("m", 1, 12, 2, heads=2, head_dim=4)
    g = {k: v[0] for k, v in init_gates(spec, jax.random.PRNGKey(1), std=0.5, bias=0.2).items()}
    g["wr"] = jnp.asarray(rng.normal(size=g["wr"].shape) * 0.3, jnp.float32)      # starts at 0: test it nonzero
    h = rng.normal(size=(1, 11, 12))
    valid = np.arange(11) >= 2                                          # two padding tokens
    got = np.asarray(jax.nn.sigmoid(keep_logits(g, jnp.asarray(h, jnp.float32), jnp.asarray(valid)[None], 2)))
    np.testing.assert_allclose(got[0][:, valid], _np_gate(g, h[0], valid, 2)[:, valid], rtol=1e-5)
    q, k, v = rng.normal(size=(4, 13, 8)), rng.normal(size=(2, 13, 8)), rng.normal(size=(2, 13, 8))
    k[0, 12] = q[0, 1] * 200 * np.sqrt(8) / (q[0, 1] @ q[0, 1])   # a future key 200 logits above query 1's
    keep = rng.random((2, 13)) < 0.5                                  # (exp overflowed: 0 * inf = NaN once)
    pos = np.arange(13)
    sp = np.broadcast_to(np.where(pos >= 1, pos, -1), (1, 2, 13))       # slot 0 empty
    out = kept_attention(jnp.asarray(q, jnp.float32)[None], jnp.asarray(k, jnp.float32)[None],
                         jnp.asarray(v, jnp.float32)[None], jnp.asarray(sp), jnp.asarray(pos)[None],
                         jnp.asarray(keep, jnp.float32)[None], 3, sink=3)
    want = _np_kept(q, k, v, keep, 3, pos >= 1, sink=3)
    np.testing.assert_allclose(np.asarray(out[0])[:, 1:], want[:, 1:], rtol=1e-5, atol=1e-6)


def test_straight_through_gradient():
    """grad wrt p of sum(R * kept_attention(keep = STE(p))) = central differences of the numpy
    surrogate keep = f0 + (p - p0) (what the STE differentiates), flags f0 = 1[p0 >= 0.5]."""
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(2, 7, 4)), rng.normal(size=(1, 7, 4)), rng.normal(size=(1, 7, 4))
    p0 = rng.uniform(0.2, 0.8, (1, 7))
    r = rng.normal(size=(2, 7, 4))
    pos = np.arange(7)
    args = [jnp.asarray(x, jnp.float32)[None] for x in (q, k, v)]

    def loss(p):
        out = kept_attention(*args, jnp.asarray(pos)[None, None], jnp.asarray(pos)[None], ste_flags(p, 0.5), 2)
        return jnp.sum(jnp.asarray(r, jnp.float32) * out[0])

    grad = np.asarray(jax.grad(loss)(jnp.asarray(p0, jnp.float32)[None]))[0]
    f0 = (p0 >= 0.5).astype(np.float64)

    def surrogate(p):                                                   # float64 soft-weighted attention
        out = np.zeros_like(q)
        for h in range(2):
            for i in range(7):
                w = np.array([1.0 if i - s < 2 else f0[0, s] + p[0, s] - p0[0, s] for s in range(i + 1)])
                sc = np.array([q[h, i] @ k[0, s] for s in range(i + 1)]) / 2.0
                e = w * np.exp(sc - sc.max())
                out[h, i] = (e / e.sum()) @ v[0, :i + 1]
        return np.sum(r * out)

    eps = 1e-5
    for s in range(7):
        d = np.zeros_like(p0)
        d[0, s] = eps
        fd = (surrogate(p0 + d) - surrogate(p0 - d)) / (2 * eps)
        np.testing.assert_allclose(grad[0, s], fd, rtol=1e-3, atol=1e-5)


def test_train_export_policy_in_engine(tmp_path):
    """A tiny training run at the default gate config (init bias, target, sink, local) stays finite
    at a large lr, lowers the loss and brings the evicted fraction to within 0.1 of the target; the exported
    (float16) gates reload; the policy's slot scores are the float64 gate probabilities (norm folded
    in) with the local window and the sinks protected; the engine's forward takes the weights as jit
    arguments (another gate set of the same shapes reuses the compiled program); generate compresses
    to the budget; errors."""
    from kvjax.generate import forward_jit
    import kvjax
    from kvjax.compression import Compression
    from kvjax.policies import Budget, make_policy
    cfg = GateTrainConfig(model="tiny", tiny=TINY_FIELDS, seq_len=48,
                          train=TrainConfig(steps=6, lr=0.05, warmup_steps=0, dtype="float32", ckpt_every=6,
                                            log_every=1))
    summary, gates = run(cfg, tmp_path / "ag", progress=False, export_dtype=np.float16)
    history = [json.loads(line) for line in (tmp_path / "ag" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 6 and all(np.isfinite(h["loss"]) and np.isfinite(h["ce"]) for h in history)
    assert summary["final"]["loss"] < summary["first"]["loss"]
    assert abs(summary["final"]["evicted"] - cfg.target) < 0.1
    gates = {k: np.asarray(v, np.float16).astype(np.float32) for k, v in gates.items()}   # as exported
    params = init_params(TINY, jax.random.PRNGKey(0), scale=0.3)
    pol = make_policy("attention_gate", gates=str(tmp_path / "ag" / "gates"), params=params, config=TINY, local=4)
    loaded, _ = load_gates(tmp_path / "ag" / "gates", TINY)
    np.testing.assert_array_equal(np.asarray(loaded["wo"]), np.asarray(gates["wo"]))
    # scores vs numpy: the gate over rms_norm(x) * w_attn_norm of layer 1's input
    toks = np.random.default_rng(7).integers(0, 256, 20)
    cache = kvcache.init_cache(2, 1, 2, 20, 8)
    pos = jnp.arange(20, dtype=jnp.int32)[None]
    _, cache, outs = forward(params, jnp.asarray(toks, jnp.int32)[None], pos, cache, TINY, Observe(hidden=True))
    x = np.asarray(outs["hidden"][1, 0], np.float64)
    hn = x / np.sqrt((x * x).mean(-1, keepdims=True) + TINY.norm_eps) * np.asarray(params["layers"][1]["attn_norm"])
    want = _np_gate({k: v[1] for k, v in gates.items()}, hn, np.ones(20, bool), 2)
    obs = Observation(cache=jax.tree_util.tree_map(lambda a: a[1:2], cache), config=TINY,
                      hidden=outs["hidden"][1:2], layer=1, n_layers=2)
    got = np.asarray(pol.score(obs)[0, 0])
    np.testing.assert_allclose(got[:, 4:16], want[:, 4:16], rtol=1e-4)
    assert np.all(np.isinf(got[:, 16:])) and np.all(np.isinf(got[:, :4]))   # local window and sinks protected
    # weights are jit arguments: a second gate set of the same shapes -> same program, other scores
    other = make_policy("attention_gate", gates=str(tmp_path / "ag" / "gates"), params=params, config=TINY, local=4)
    other = dataclasses.replace(other, weights=Frozen(jax.tree_util.tree_map(lambda a: -a, other.weights.tree)))
    before = forward_jit._cache_size()
    runs = [forward_jit(params, jnp.asarray(toks, jnp.int32)[None], pos, kvcache.init_cache(2, 1, 2, 20, 8), TINY,
                        observer=Compression(p, Budget(tokens=8)).observer())[2]["scores"] for p in (pol, other)]
    assert forward_jit._cache_size() == before + 1
    np.testing.assert_allclose(np.asarray(runs[0][1, 0, :, 4:16]), got[:, 4:16], rtol=1e-5)
    assert not np.allclose(np.asarray(runs[1][1, 0, :, 4:16]), got[:, 4:16])
    comp = Compression(pol, Budget(tokens=8))
    out = kvjax.generate(unstack_params(params), TINY, [list(toks)], max_new_tokens=2, compression=comp,
                         attention="xla")
    dense = kvjax.generate(unstack_params(params), TINY, [list(toks)], max_new_tokens=2,
                           compression=Compression(make_policy("knorm"), Budget(tokens=8)), attention="xla")
    assert out.stats["cache_bytes"] == dense.stats["cache_bytes"] < 20 * 2 * 2 * 2 * 8 * 4
    with pytest.raises(ValueError, match="when must be 'prefill'"):
        Compression(pol, Budget(tokens=8), when="chunk")
    with pytest.raises(ValueError, match="trained for model"):
        make_policy("attention_gate", gates=str(tmp_path / "ag" / "gates"), params=params,
                    config=ModelConfig(**{**TINY.__dict__, "name": "other"}))
    with pytest.raises(ValueError, match="needs its trained gates"):
        make_policy("attention_gate", params=params, config=TINY)
    with pytest.raises(FileNotFoundError, match="not an Attention-Gate export"):
        make_policy("attention_gate", gates=str(tmp_path), params=params, config=TINY)
    with pytest.raises(ValueError, match="target"):
        GateTrainConfig(target=1.0)
