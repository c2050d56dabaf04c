"""Locret (arXiv 2410.01805): labels, retaining heads, chunked eviction loop, training loop, export.

References are float64 numpy written from the spec (§2 of eviction_merging_learned.md); the tiny
model's q/k/v are recomputed here by an independent numpy forward.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.policies.locret import (HeadSpec, Locret, head_scores, init_heads, load_heads, locret_prefill,
                                   save_heads)
from models.config import ModelConfig
from models.llama import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(name="tiny-locret-test", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, ffn_dim=64, rope_theta=10000.0, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    return TINY, init_params(TINY, jax.random.PRNGKey(3), scale=0.3, stacked=True)


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy forward returning per-layer pre-RoPE q/k/v.

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    """x [T, H, d] rotated as complex pairs (i, i + d/2) by positions pos [T]."""
    d = x.shape[-1]
    z = x[..., :d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * pos[:, None, None] * theta ** (-np.arange(0, d, 2) / d))
    return np.concatenate([z.real, z.imag], -1)


def np_qkv(params, config, tokens):
    """Per layer: q_pre [T, Hq, d], k_pre [T, Hkv, d], v [T, Hkv, d] (float64, full causal context)."""
    lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    x = np.asarray(params["embed"], np.float64)[np.asarray(tokens)]
    t, hq, hkv, d = len(tokens), config.n_heads, config.n_kv_heads, config.head_dim
    pos = np.arange(t, dtype=np.float64)
    out = []
    for l in range(config.n_layers):
        h = _rms(x, lay["attn_norm"][l], config.norm_eps)
        q, k, v = (h @ lay["wq"][l]).reshape(t, hq, d), (h @ lay["wk"][l]).reshape(t, hkv, d), \
            (h @ lay["wv"][l]).reshape(t, hkv, d)
        out.append((q, k, v))
        qr, kr = _rope(q, pos, config.rope_theta), _rope(k, pos, config.rope_theta)
        att = np.empty((t, hq, d))
        for head in range(hq):
            g = head // (hq // hkv)
            s = qr[:, head] @ kr[:, g].T / np.sqrt(d)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            att[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, g]
        x = x + att.reshape(t, -1) @ lay["wo"][l]
        h = _rms(x, lay["mlp_norm"][l], config.norm_eps)
        gte = h @ lay["w_gate"][l]
        x = x + (gte / (1 + np.exp(-gte)) * (h @ lay["w_up"][l])) @ lay["w_down"][l]
    return out


def np_cis(params, config, prompt, response, mask):
    """CIS [L, Hkv, P] = max over valid response queries and the GQA group of q.k/sqrt(d)."""
    toks = np.concatenate([prompt, response])
    P, T = len(prompt), len(toks)
    pos = np.arange(T, dtype=np.float64)
    g = config.n_heads // config.n_kv_heads
    out = np.full((config.n_layers, config.n_kv_heads, P), -np.inf)
    for l, (q, k, _) in enumerate(np_qkv(params, config, toks)):
        qr, kr = _rope(q, pos, config.rope_theta), _rope(k, pos, config.rope_theta)
        for h in range(config.n_kv_heads):
            for i in range(P, T):
                if not mask[i - P]:
                    continue
                for gg in range(g):
                    s = kr[:P, h] @ qr[i, h * g + gg] / np.sqrt(config.head_dim)
                    out[l, h] = np.maximum(out[l, h], s)
    return out


def np_head_scores(heads, qkv):
    """[L, Hkv, T] from the numpy q/k/v: W2 silu(W1 concat(q, k, v))."""
    res = []
    for l, (q, k, v) in enumerate(qkv):
        t = q.shape[0]
        x = np.concatenate([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], -1)
        hid = x @ np.asarray(heads["w1"][l], np.float64)
        hid = hid / (1 + np.exp(-hid))
        res.append((hid @ np.asarray(heads["w2"][l], np.float64)).T)
    return np.stack(res)


# ----------------------------------------------------------------------------------------------

def test_labels_match_float64_reference(tiny):
    from train.locret import compute_labels
    config, params = tiny
    rng = np.random.default_rng(0)
    P, R = 14, 5
    prompt = rng.integers(0, config.vocab_size, (2, P))
    response = rng.integers(0, config.vocab_size, (2, R))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    got = np.asarray(compute_labels(params, jnp.asarray(np.concatenate([prompt, response], 1), jnp.int32),
                                    jnp.asarray(mask), config=config, prompt_len=P))
    assert got.shape == (2, config.n_layers, config.n_kv_heads, P)
    for b in range(2):
        want = np_cis(params, config, prompt[b], response[b], mask[b])
        np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=2e-4)
    # masking matters: the unmasked result differs for row 0
    full = np_cis(params, config, prompt[0], response[0], np.ones(R, bool))
    assert np.abs(full - got[0]).max() > 1e-3


def test_head_scores_match_reference(tiny):
    config, params = tiny
    from kvjax.observation import Observe
    from models.llama import forward
    from kvjax import cache as kvcache
    spec = HeadSpec.for_model(config, 16)
    heads = init_heads(spec, jax.random.PRNGKey(1), std=0.3)
    toks = np.random.default_rng(1).integers(0, config.vocab_size, 11)
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, 11, config.head_dim)
    _, _, obs = forward(params, jnp.asarray(toks[None], jnp.int32), jnp.arange(11, dtype=jnp.int32)[None], cache,
                        config, Observe(qkv=True))
    got = np.asarray(head_scores(heads, obs["q_pre"], obs["k_pre"], obs["v"]))[:, 0]
    np.testing.assert_allclose(got, np_head_scores(heads, np_qkv(params, config, toks)), rtol=1e-4, atol=1e-5)


def test_chunked_loop_budget_stabilizers_and_first_selection(tiny):
    config, params = tiny
    spec = HeadSpec.for_model(config, 16)
    heads = init_heads(spec, jax.random.PRNGKey(2), std=0.3)
    n, B, C, ns, nloc = 90, 12, 16, 5, 7
    toks = np.random.default_rng(2).integers(0, config.vocab_size, n)
    pol = Locret(budget=B, chunk=C, n_stabilizers=ns, n_local=nloc)
    trace = []
    _, state = locret_prefill(params, config, heads, jnp.asarray(toks[None]), pol, extra_capacity=3, trace=trace)
    m = n - nloc
    ends = [min(s + C, m) for s in range(0, m, C)]
    assert len(trace) == len(ends)
    for e, st in zip(ends, trace):
        lengths = np.asarray(st.cache.lengths)
        origin = np.asarray(st.origin)[:, 0]                             # [L, Hkv, S]
        pos = np.asarray(st.cache.positions)[:, 0]
        assert (lengths == min(B, e)).all(), (e, lengths)
        for l in range(config.n_layers):
            for h in range(config.n_kv_heads):
                live = origin[l, h][origin[l, h] >= 0]
                assert len(live) == min(B, e) and (np.diff(live) > 0).all()      # chronological
                np.testing.assert_array_equal(pos[l, h][:len(live)], np.arange(len(live)))  # contiguous
                if e < m:                                                         # stabilizers survive
                    assert set(range(e - ns, e)) <= set(live.tolist())
    # first chunk: its context is the chunk alone, so the kept set is reproducible in numpy:
    # the last ns tokens plus the top-(B - ns) of the others by the float64 head scores.
    s = np_head_scores(heads, np_qkv(params, config, toks[:C]))                   # [L, Hkv, C]
    first = np.asarray(trace[0].origin)[:, 0]
    for l in range(config.n_layers):
        for h in range(config.n_kv_heads):
            rest = np.argsort(-s[l, h, :C - ns], kind="stable")[:B - ns]
            want = sorted(set(rest.tolist()) | set(range(C - ns, C)))
            assert first[l, h][first[l, h] >= 0].tolist() == want
    # the local tail is appended without eviction, leaving room for decode
    final = np.asarray(state.origin)[:, 0]
    assert (np.asarray(state.cache.lengths) == B + nloc).all()
    assert state.cache.capacity == B + nloc + 3
    for l in range(config.n_layers):
        for h in range(config.n_kv_heads):
            assert final[l, h][B:B + nloc].tolist() == list(range(m, n))


def test_locret_rejects_bad_config():
    for kw in ({"budget": 0}, {"chunk": 0}, {"n_stabilizers": -1}):
        with pytest.raises(ValueError):
            Locret(**kw)


def test_models_with_sliding_window_layers_are_refused(tiny, tmp_path):
    """A Gemma-shaped model (a local layer) fails with the reason at every Locret entry: head shapes
    (training), loading heads, and the prefill, before any forward runs."""
    import dataclasses
    config, params = tiny
    spec = HeadSpec.for_model(config, 16)
    heads = init_heads(spec, jax.random.PRNGKey(4))
    save_heads(tmp_path / "h", heads, spec)
    gemma_like = dataclasses.replace(config, local_layers=(0,), sliding_window=4)
    why = "Locret needs a model whose layers are all global.*1 sliding-window layers of 2"
    with pytest.raises(ValueError, match=why):
        HeadSpec.for_model(gemma_like)
    with pytest.raises(ValueError, match=why):
        load_heads(tmp_path / "h", gemma_like)
    with pytest.raises(ValueError, match=why):
        locret_prefill(params, gemma_like, heads, jnp.zeros((1, 12), jnp.int32), Locret(budget=4, chunk=4, n_local=2))


def test_heads_export_roundtrip_and_errors(tiny, tmp_path):
    config, params = tiny
    spec = HeadSpec.for_model(config, 16)
    heads = init_heads(spec, jax.random.PRNGKey(4), std=0.3)
    save_heads(tmp_path / "h", heads, spec)
    back = load_heads(tmp_path / "h", config)
    q = jax.random.normal(jax.random.PRNGKey(5), (2, 1, 4, 6, 8))
    k = jax.random.normal(jax.random.PRNGKey(6), (2, 1, 2, 6, 8))
    np.testing.assert_array_equal(np.asarray(head_scores(heads, q, k, k)), np.asarray(head_scores(back, q, k, k)))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_heads(tmp_path / "missing", config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Locret heads export"):
        load_heads(tmp_path / "empty", config)
    import dataclasses
    other = dataclasses.replace(config, n_layers=3)
    with pytest.raises(ValueError, match="trained for model"):
        load_heads(tmp_path / "h", dataclasses.replace(config, name="other-model"))
    with pytest.raises(ValueError, match="n_layers is 2 in the heads but 3"):
        load_heads(tmp_path / "h", other, check_name=False)
    (tmp_path / "h" / "heads.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_heads(tmp_path / "h", config)
    meta = json.loads((tmp_path / "h" / "meta.json").read_text())
    (tmp_path / "h" / "meta.json").write_text(json.dumps({**meta, "format": "x"}))
    with pytest.raises(ValueError, match="not a Locret heads export"):
        load_heads(tmp_path / "h", config)
    with pytest.raises(ValueError, match="retaining head w1"):
        save_heads(tmp_path / "bad", {"w1": heads["w1"][:, :3], "w2": heads["w2"]}, spec)


def test_topk_overlap_and_loss_reference():
    from train.locret import smooth_l1, topk_overlap
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(3, 2, 50)), rng.normal(size=(3, 2, 50))
    want = np.mean([len(set(np.argsort(-a[i, j])[:5]) & set(np.argsort(-b[i, j])[:5])) / 5
                    for i in range(3) for j in range(2)])
    assert abs(float(topk_overlap(jnp.asarray(a), jnp.asarray(b))) - want) < 1e-6
    assert float(topk_overlap(jnp.asarray(a), jnp.asarray(a))) == 1.0
    d = np.array([-3.0, -0.5, 0.2, 2.0])
    want = np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)
    np.testing.assert_allclose(np.asarray(smooth_l1(jnp.asarray(d), jnp.zeros(4), 1.0)), want)


def test_data_is_deterministic_and_shaped():
    from train.data import DataConfig, make_dataset, make_example
    cfg = DataConfig(prompt_len=300, response_len=12, tokenizer="bytes", seed=5)
    a, b = make_dataset(cfg, "train", 6), make_dataset(cfg, "train", 6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["prompt"].shape == (6, 300) and a["response"].shape == (6, 12)
    h = make_example(cfg, "heldout", 0)
    assert not np.array_equal(h["prompt"], a["prompt"][0])
    for i in range(20):  # needle answers are stated in the prompt
        ex = make_example(DataConfig(prompt_len=300, response_len=12, tokenizer="bytes", mix=(0, 1, 1)), "train", i)
        ans = bytes(ex["response"][ex["response_mask"]].tolist()).decode().strip(" .")
        assert ans in bytes(ex["prompt"].tolist()).decode() and ans.isdigit()


def test_checkpoint_kill_resume_matches_uninterrupted(tmp_path):
    """Train 8 steps with checkpoints every 2; a process SIGKILLed after step 4 and restarted
    ends with the same losses as an uninterrupted run; the export equals the trained heads."""
    from train.locret import load_config, run
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps({
        "model": "tiny", "tiny": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                  "head_dim": 8, "ffn_dim": 64, "scale": 0.3},
        "hidden": 16, "n_examples": 6, "label_batch": 6,
        "data": {"prompt_len": 256, "response_len": 12, "tokenizer": "bytes"},
        "train": {"steps": 8, "batch_size": 2, "warmup_steps": 2, "dtype": "float32", "ckpt_every": 2,
                  "log_every": 1, "lr": 3e-3, "keep": 2}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "train.locret", "--config", str(cfg_path), "--out", str(tmp_path / "a"),
           "--no-progress"]
    died = subprocess.run(cmd + ["--die-after", "4"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    assert not (tmp_path / "a" / "heads").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "a" / "ckpt").iterdir() if p.name.isdigit())
    assert steps[-1] == 4 and len(steps) <= 2                       # keep=2
    resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, heads = run(load_config(cfg_path), tmp_path / "b", progress=False)
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-5)
    config = dataclasses_replace_name(load_config(cfg_path))
    exported = load_heads(tmp_path / "b" / "heads", config)
    for k in heads:
        np.testing.assert_array_equal(np.asarray(exported[k]), np.asarray(heads[k]))
    resumed_heads = load_heads(tmp_path / "a" / "heads", config)
    for k in heads:
        np.testing.assert_allclose(np.asarray(resumed_heads[k]), np.asarray(heads[k]), rtol=1e-5, atol=1e-7)


def dataclasses_replace_name(cfg):
    from train.locret import load_backbone
    return load_backbone(cfg)[0]


def test_no_eviction_equals_full_cache(tiny):
    """With a budget >= the prompt nothing is evicted and positions stay 0..n-1: same logits as a full prefill."""
    from kvjax import cache as kvcache
    from models.llama import forward
    config, params = tiny
    heads = init_heads(HeadSpec.for_model(config, 16), jax.random.PRNGKey(8))
    toks = jnp.asarray(np.random.default_rng(9).integers(0, config.vocab_size, (1, 30)), jnp.int32)
    last, state = locret_prefill(params, config, heads, toks, Locret(budget=64, chunk=8, n_stabilizers=2, n_local=4),
                                 extra_capacity=6)   # same shapes as the generate test below (shared compiles)
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, 30, config.head_dim)
    want, _, _ = forward(params, toks, jnp.arange(30, dtype=jnp.int32)[None], cache, config)
    np.testing.assert_allclose(np.asarray(last), np.asarray(want[:, -1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.origin)[:, 0, :, :30], np.broadcast_to(np.arange(30), (2, 2, 30)))


def test_committed_smollm2_heads_load():
    """The exported heads in docs/locret load for SmolLM2-135M and are rejected for another model."""
    from models.config import LLAMA3_8B, SMOLLM2_135M
    path = ROOT / "docs" / "locret" / "heads"
    heads = load_heads(path, SMOLLM2_135M)
    assert heads["w1"].shape == (30, (9 + 6) * 64, 144) and heads["w2"].shape == (30, 144, 3)
    assert np.isfinite(np.asarray(heads["w1"])).all()
    with pytest.raises(ValueError, match="trained for model"):
        load_heads(path, LLAMA3_8B)


def test_locret_generate_decodes_without_eviction(tiny):
    """Plain decode after the Locret prefill: with nothing evicted, greedy tokens equal kvjax.generate's."""
    from kvjax.generate import generate
    from kvjax.policies.locret import locret_generate
    config, params = tiny
    heads = init_heads(HeadSpec.for_model(config, 16), jax.random.PRNGKey(10))
    prompt = np.random.default_rng(11).integers(0, config.vocab_size, 30).tolist()
    got = locret_generate(params, config, heads, prompt, Locret(budget=64, chunk=8, n_stabilizers=2, n_local=4),
                          max_new_tokens=6, eos_ids=())
    want = generate(params, config, [prompt], max_new_tokens=6, eos_ids=(), bucket=1).tokens[0]
    assert got == want and len(got) == 6
