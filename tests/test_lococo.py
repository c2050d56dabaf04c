"""LoCoCo (kvjax/policies/lococo.py, train/lococo.py): the fusion vs a float64 numpy loop of the spec
formula (§10.1 of eviction_merging_learned.md), constant cache bytes on the chunk schedule and
generate on a tiny model, the training loss's gradient vs central differences (float64) and a
loss decrease on a fixed batch, export / reload and the errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.compression import Compression
from kvjax.generate import generate
from kvjax.policies import Budget, make_policy
from kvjax.policies.base import select
from kvjax.policies.lococo import CompressorSpec, LoCoCo, init_compressor, load_compressor
from models.config import ModelConfig
from train.loop import TrainConfig

TINY_FIELDS = (("d_model", 32), ("ffn_dim", 64), ("head_dim", 8), ("n_heads", 4), ("n_kv_heads", 2),
               ("n_layers", 2), ("scale", 0.3), ("vocab_size", 256))


def _np_fused_layer(k, v, valid, scores, w, keep, act):
    """float64 loops, one (batch, head): the kept slots' keys / values after LoCoCo, as
    {slot: (key, value)} over the top-(keep + M) live slots by score (all live slots when no more)."""
    cw, cb, lam = (np.asarray(w[n], np.float64) for n in ("conv_w", "conv_b", "lam"))
    m, _, ksz = cw.shape
    live = [s for s in range(len(valid)) if valid[s]]
    if len(live) <= keep + m:
        return {s: (k[s], v[s]) for s in live}
    by_score = sorted(live, key=lambda s: (-scores[s], s))
    heavy = set(by_score[:keep])
    nh = [s for s in live if s not in heavy]                                  # chronological
    x = np.concatenate([k[nh], v[nh]], 1).T                                   # [2d, S]
    n = len(nh)
    xp = np.pad(x, [(0, 0), (ksz // 2, ksz // 2)])
    y = np.array([[cb[o] + sum(cw[o, c, j] * xp[c, t + j] for c in range(x.shape[0]) for j in range(ksz))
                   for t in range(n)] for o in range(m)])
    if act == "relu":
        y = np.maximum(y, 0)
    e = np.exp(y - y.max(1, keepdims=True))
    mix = e / e.sum(1, keepdims=True)
    top_m = sorted(by_score[keep:keep + m])                                   # R's tokens, chronological
    r = np.zeros((m, n))
    for row, s in enumerate(top_m):
        r[row, nh.index(s)] = 1
    wt = (1 - lam) * r + lam * mix
    kmem, vmem = wt @ k[nh], wt @ v[nh]
    out = {s: (k[s], v[s]) for s in heavy}
    out.update({s: (kmem[row], vmem[row]) for row, s in enumerate(top_m)})
    return out


@pytest.mark.parametrize("act", ["relu", "none"])
def test_fusion_matches_float64_spec_formula(act):
    rng = np.random.default_rng(0)
    b, h, s, d = 2, 2, 24, 4
    spec = CompressorSpec("m", n_layers=2, kv_heads=h, head_dim=d, mem_size=8, hh_keep_rate=0.5, kernel=5, act=act)
    w = {"conv_w": rng.normal(0, 0.4, spec.shapes()["conv_w"]), "conv_b": rng.normal(0, 0.3, spec.shapes()["conv_b"]),
         "lam": np.array([0.5, 0.3])}
    keys, values = rng.normal(size=(b, h, s, d)), rng.normal(size=(b, h, s, d))
    valid = np.ones((b, h, s), bool)
    valid[0, 1, 19:] = False                      # a head with fewer live slots (still over mem_size)
    valid[1, 0, 7:] = False                       # a head within mem_size: left as it is
    scores = rng.random((b, h, s)) * valid
    pos = np.where(valid, np.arange(s), -1)
    old = kvcache.KVCache(jnp.asarray(keys, jnp.float32), jnp.asarray(values, jnp.float32), jnp.asarray(pos, jnp.int32),
                          jnp.asarray(valid.sum(-1), jnp.int32))
    policy = LoCoCo.from_weights({n: jnp.asarray(a, jnp.float32) for n, a in w.items()}, spec)
    sc = jnp.asarray(scores, jnp.float32)
    idx = select(sc[None], old.valid[None], jnp.full((1, b, h), 8), 8)[0]
    layer = 1
    got_k, got_v = policy.merge(old, idx, sc, layer)
    w_layer = {n: a[layer] for n, a in w.items()}
    scale = np.abs(keys).max()
    for bi in range(b):
        for hi in range(h):
            want = _np_fused_layer(keys[bi, hi], values[bi, hi], valid[bi, hi], scores[bi, hi], w_layer, spec.keep, act)
            rows = [int(i) for i in idx[bi, hi] if i >= 0]
            assert sorted(want) == rows
            for r, slot in enumerate(rows):
                np.testing.assert_allclose(got_k[bi, hi, r], want[slot][0], atol=1e-5 * scale)
                np.testing.assert_allclose(got_v[bi, hi, r], want[slot][1], atol=1e-5 * scale)
    # a head over mem_size really changed (some fused row differs from its one-hot token)
    assert not np.allclose(np.asarray(got_k[0, 0]), keys[0, 0, np.asarray(idx[0, 0])], atol=1e-3)
    with pytest.raises(ValueError, match="Budget\\(tokens=8\\)"):
        policy.merge(old, idx[..., :6], sc, layer)


@pytest.fixture(scope="module")
def tiny():
    from train.lococo import LoCoCoTrainConfig, load_backbone
    cfg = LoCoCoTrainConfig(model="tiny", tiny=TINY_FIELDS, chunk=16, n_chunks=2, mem_size=8, kernel=5,
                            train=TrainConfig(lr=0.05, warmup_steps=0, steps=2, clip_value=0.0, dtype="float32",
                                              weight_decay=0.0, ckpt_every=1, log_every=1),
                            export_dtype="float32")
    config, params = load_backbone(cfg)
    return cfg, config, params


def test_chunk_schedule_constant_memory_and_generate(tiny):
    from models.llama import unstack_params
    cfg, config, params = tiny
    spec = cfg.spec(config)
    policy = LoCoCo.from_weights(init_compressor(spec, jax.random.PRNGKey(1)), spec)
    comp = Compression(policy, Budget(tokens=spec.mem_size), when="chunk")
    p = unstack_params(params)
    rng = np.random.default_rng(1)
    stats = []
    for n in (32, 96):
        prompt = rng.integers(1, 255, n).tolist()
        r = generate(p, config, [prompt], 3, chunk_size=16, compression=comp)
        assert len(r.tokens[0]) == 3
        stats.append((r.stats["cache_bytes"], r.stats["peak_cache_bytes"]))
    assert stats[0] == stats[1]                       # fixed memory whatever the context length
    full = generate(p, config, [prompt], 3, chunk_size=16).stats["cache_bytes"]
    assert stats[1][1] < full / 3                     # budget 8 + chunk 16 (+ room) vs 96 + 3 slots


def test_train_gradient_matches_central_differences_and_loss_decreases(tiny):
    """Two chunks (the fixture's): one compression, whose input (chunk 0's K/V and scores) does not depend on the
    compressor, so the truncated gradient (detached cache before every compression) is the full
    gradient there; with more chunks it is by design not (later memories' inputs are detached). The
    forward computes logits in float32, so the central difference uses eps = 1e-2 along a unit direction."""
    import optax
    from train.lococo import make_loss
    cfg, config, params = tiny
    assert cfg.n_chunks == 2
    spec = cfg.spec(config)
    rng = np.random.default_rng(2)
    toks = jnp.asarray(rng.integers(0, 256, (1, cfg.seq_len + 1)), jnp.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:]}
    w = init_compressor(spec, jax.random.PRNGKey(3), std=0.3)
    vg = jax.jit(jax.value_and_grad(lambda w: make_loss(config, cfg)(w, params, batch)[0]))
    direction = {n: jnp.asarray(np.random.default_rng(4).normal(size=a.shape), jnp.float32) for n, a in w.items()}
    norm = np.sqrt(sum(float(jnp.sum(u * u)) for u in direction.values()))
    direction = {n: u / norm for n, u in direction.items()}
    eps = 1e-2
    shift = lambda sgn: jax.tree_util.tree_map(lambda a, u: a + sgn * eps * u, w, direction)
    fd = (float(vg(shift(1))[0]) - float(vg(shift(-1))[0])) / (2 * eps)
    loss0, g = vg(w)
    an = sum(float(jnp.vdot(g[n], direction[n])) for n in w)
    assert abs(an) > 1e-3
    assert abs(fd - an) <= 3e-2 * abs(an)
    opt = optax.adam(0.05)                       # steps on one fixed batch: the loss goes down
    state = opt.init(w)
    losses = [float(loss0)]
    for _ in range(4):
        updates, state = opt.update(g, state, w)
        w = optax.apply_updates(w, updates)
        value, g = vg(w)
        losses.append(float(value))
    assert losses[-1] < losses[0]


def test_run_exports_and_reloads_with_errors(tiny, tmp_path):
    from train.lococo import run
    cfg, config, params = tiny
    summary, w = run(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and (tmp_path / "run" / "metrics.jsonl").is_file()
    back, spec = load_compressor(tmp_path / "run" / "compressor", config)
    for n in w:
        np.testing.assert_array_equal(np.asarray(back[n]), np.asarray(w[n]))
    pol = make_policy("lococo", weights=str(tmp_path / "run" / "compressor"), config=config)
    assert (pol.mem_size, pol.keep) == (8, 4)
    other = ModelConfig(name="other", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        ffn_dim=64)
    with pytest.raises(ValueError, match="trained for model"):
        load_compressor(tmp_path / "run" / "compressor", other)
    with pytest.raises(FileNotFoundError, match="not a LoCoCo export"):
        load_compressor(tmp_path, config)
    with pytest.raises(ValueError, match="weights=DIR"):
        make_policy("lococo", config=config)
    with pytest.raises(ValueError, match="no fused slot"):
        CompressorSpec("m", 2, 2, 8, mem_size=4, hh_keep_rate=0.9)
