"""DuoAttention gate training (train/duo.py, train/duo_data.py): the mixed forward and the loss
against an independent float64 numpy forward (tests/numpy_reference.py), the official LR lambda,
gradients, clamp, checkpoint kill/resume, export/reload and errors. Spec §4 of
eviction_merging_learned.md."""
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

from kvjax import cache as kvcache
from models.config import ModelConfig
from models.llama import forward, init_params
from tests.numpy_reference import reference_logits
from train.duo import (DuoMix, DuoTrainConfig, binarise, load_config, load_gates, make_loss, masked_attention,
                       run, streaming_mask)
from train.duo_data import PasskeyConfig, make_batch, make_example
from train.loop import TrainConfig, schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ModelConfig(name="tiny-locret", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, ffn_dim=64, tie_embeddings=True)
TINY_JSON = {"model": "tiny", "tiny": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                       "head_dim": 8, "ffn_dim": 64, "scale": 0.3},
             "sink": 4, "recent": 32, "deploy_sink": 4, "deploy_recent": 32,
             "data": {"n_passkeys": 2, "n_words": 2, "min_len": 384, "max_len": 384, "n_lengths": 1,
                      "tokenizer": "bytes"},
             "train": {"steps": 4, "dtype": "float32", "ckpt_every": 2, "log_every": 1, "keep": 2}}


@pytest.fixture(scope="module")
def tiny():
    return TINY, init_params(TINY, jax.random.PRNGKey(5), scale=0.3, stacked=True)


def _hidden(params, config, tokens, mod=None):
    t = len(tokens)
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    h, _, _ = forward(params, jnp.asarray(tokens, jnp.int32)[None], jnp.arange(t, dtype=jnp.int32)[None], cache,
                      config, return_hidden=True, attn_mod=mod, attention="xla")
    return np.asarray(h[0], np.float64)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_mixed_forward_matches_float64_reference(tiny):
    """forward(attn_mod=DuoMix) final hidden states = the numpy float64 forward with per-kv-head
    alpha * full + (1 - alpha) * sink/recent attention; alpha = 1 is the plain model."""
    config, params = tiny
    toks = np.random.default_rng(0).integers(0, config.vocab_size, 29)
    alpha = np.asarray([[0.0, 0.7], [0.25, 1.0]])
    got = _hidden(params, config, toks, DuoMix(jnp.asarray(alpha, jnp.float32), sink=3, recent=5))
    want = reference_logits(params, config, toks, duo=(alpha, 3, 5), hidden=True)
    assert _rel(got, want) < 1e-5
    plain = reference_logits(params, config, toks, hidden=True)
    assert _rel(want, plain) > 1e-3                                    # the mix changes the function
    ones = _hidden(params, config, toks, DuoMix(jnp.ones((2, 2), jnp.float32), sink=3, recent=5))
    assert _rel(ones, plain) < 1e-5


def test_streaming_mask_and_attention_reference():
    """The token-exact sink + recent mask and masked attention vs explicit float64 loops."""
    rng = np.random.default_rng(1)
    pos = np.tile(np.arange(12), (1, 2, 1))
    pos[0, 1, 10:] = -1                                               # empty slots
    qpos = np.arange(12)[None]
    m = np.asarray(streaming_mask(jnp.asarray(pos), jnp.asarray(qpos), 2, 4))
    for h in range(2):
        for t in range(12):
            for s in range(12):
                live = pos[0, h, s] >= 0 and pos[0, h, s] <= t
                assert m[0, h, t, s] == (live and (pos[0, h, s] < 2 or t - pos[0, h, s] < 4))
    q, k, v = rng.normal(size=(1, 4, 12, 8)), rng.normal(size=(1, 2, 12, 8)), rng.normal(size=(1, 2, 12, 8))
    got = np.asarray(masked_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                      jnp.asarray(v, jnp.float32), jnp.asarray(m)))
    for hq in range(4):
        for t in range(12):
            vis = m[0, hq // 2, t]
            s = q[0, hq, t] @ k[0, hq // 2, vis].T / np.sqrt(8)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[0, hq, t], p / p.sum() @ v[0, hq // 2, vis], rtol=1e-5, atol=1e-6)


def test_loss_and_gradient_match_reference(tiny):
    """loss = sum over label tokens of mean_d (h_full - h_mixed)^2 / N + 0.05 mean|alpha| from the
    float64 forward; d loss / d alpha matches central differences; only alpha is differentiated."""
    config, params = tiny
    cfg = DuoTrainConfig(model="tiny", sink=3, recent=5, train=TrainConfig(dtype="float32"))
    toks = np.random.default_rng(2).integers(0, config.vocab_size, 26)
    mask = np.zeros(26, bool)
    mask[[4, 17, 20, 25]] = True
    alpha = np.asarray([[0.3, 0.9], [0.6, 0.1]])
    h_full = reference_logits(params, config, toks, hidden=True)
    h_mix = reference_logits(params, config, toks, duo=(alpha, 3, 5), hidden=True)
    want = ((h_full - h_mix) ** 2).mean(-1)[mask].sum() / mask.sum() + 0.05 * np.abs(alpha).mean()
    loss_fn = jax.jit(make_loss(config, cfg))
    batch = {"tokens": jnp.asarray(toks, jnp.int32)[None], "label_mask": jnp.asarray(mask)[None]}
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(alpha, jnp.float32), params, batch)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    assert g.shape == alpha.shape and np.all(np.isfinite(np.asarray(g)))
    eps = 1e-2
    f = lambda a: float(loss_fn(jnp.asarray(a, jnp.float32), params, batch)[0])
    for idx in [(0, 0), (1, 1)]:
        d = np.zeros_like(alpha)
        d[idx] = eps
        fd = (f(alpha + d) - f(alpha - d)) / (2 * eps)
        np.testing.assert_allclose(float(g[idx]), fd, rtol=5e-2, atol=1e-5)


def test_duo_schedule_is_the_official_lambda():
    cfg = TrainConfig(steps=50, lr=0.02, lr_schedule="duo")
    sched = schedule(cfg)
    n = 50
    for s in range(n):
        want = 0.02 * min(1.0, max((s + 1) / (n / 5), 0.1), max((n - s) / (n / 5), 0.1))
        np.testing.assert_allclose(float(sched(s)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_data_passkeys_labels_and_determinism():
    cfg = PasskeyConfig(n_passkeys=3, n_words=4, min_len=700, max_len=800, n_lengths=3, tokenizer="bytes")
    ex = make_example(cfg, "train", 4, 750)
    assert ex["tokens"].shape == (750,) and ex["label_mask"].dtype == bool
    text = bytes(ex["tokens"].tolist()).decode()
    answers = bytes(ex["tokens"][ex["label_mask"]].tolist()).decode()
    assert text.count("passkey to the vault:") == 3 and text.count("What is the") == 3
    for j, ordinal in enumerate(("first", "second", "third")):
        words = text.split(f"it's the {ordinal} passkey to the vault: ")[1].split(".")[0]
        assert len(words.split()) == 4 and f" {words}." in answers
    np.testing.assert_array_equal(make_example(cfg, "train", 4, 750)["tokens"], ex["tokens"])
    b = make_batch(cfg, "train", 3, 2)
    assert b["tokens"].shape[0] == 2 and b["tokens"].shape[1] in cfg.lengths
    with pytest.raises(ValueError, match="cannot hold"):
        make_example(cfg, "train", 0, 100)
    with pytest.raises(ValueError, match="n_passkeys"):
        PasskeyConfig(n_passkeys=0)


def test_errors(tiny):
    config, params = tiny
    with pytest.raises(ValueError, match="sparsity"):
        DuoTrainConfig(sparsity=1.5)
    toks = jnp.zeros((1, 8), jnp.int32)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, 8, config.head_dim)
    with pytest.raises(ValueError, match="kv heads"):
        forward(params, toks, pos, cache, config, attn_mod=DuoMix(jnp.ones((2, 3)), 2, 2))
    from kvjax.quant import make_cache_init
    qcache = make_cache_init("kivi2", group=8, residual=8)(config, 1, 8)
    with pytest.raises(ValueError, match="dense KVCache"):
        forward(params, toks, pos, qcache, config, attn_mod=DuoMix(jnp.ones((2, 2)), 2, 2))


def _cfg_file(tmp_path, **train):
    raw = json.loads(json.dumps(TINY_JSON))
    raw["train"].update(train)
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(raw))
    return p


def test_training_moves_alpha_clamps_and_exports(tmp_path):
    """Loss decreases, alpha moves; with a large lr alpha is driven to the clamp (0, never below);
    the exported gates / tsv / pattern.json reload to the trained alphas and the binarised
    pattern; a pattern of another model is refused."""
    from kvjax.policies import make_policy
    summary, alpha = run(load_config(_cfg_file(tmp_path, steps=5, ckpt_every=5)), tmp_path / "a", progress=False)
    hist = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < hist[0]["loss"] and alpha.mean() < 1.0
    np.testing.assert_array_equal(load_gates(tmp_path / "a" / "gates"), alpha)
    tsv = np.loadtxt(tmp_path / "a" / "full_attention_heads.tsv", delimiter="\t")
    np.testing.assert_allclose(tsv, alpha, atol=1e-6)
    pol = make_policy("duo_attention", pattern_file=str(tmp_path / "a" / "pattern.json"), config=TINY)
    assert pol.pattern == binarise(alpha, 0.5).pattern and sum(map(sum, pol.pattern)) == 2
    other = ModelConfig(name="other", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        ffn_dim=64)
    with pytest.raises(ValueError, match="trained for model"):
        make_policy("duo_attention", pattern_file=str(tmp_path / "a" / "pattern.json"), config=other)
    _, hot = run(load_config(_cfg_file(tmp_path, steps=3, lr=2.0, ckpt_every=3), sparsity=None),
                 tmp_path / "b", progress=False)
    hot_hist = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["alpha_min"] for r in hot_hist) == 0.0          # an lr-2 step overshoots: clamped at 0
    assert 0.0 <= hot.min() and hot.max() <= 1.0


def test_checkpoint_kill_resume_matches_uninterrupted(tmp_path):
    """SIGKILL after the step-2 checkpoint, restart: same losses and alphas as one uninterrupted run."""
    cfg_path = _cfg_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "train.duo", "--config", str(cfg_path), "--out", str(tmp_path / "a"),
           "--no-progress", "--die-after", "2"]
    died = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    assert not (tmp_path / "a" / "pattern.json").exists()
    _, resumed = run(load_config(cfg_path), tmp_path / "a", progress=False)
    _, fresh = run(load_config(cfg_path), tmp_path / "b", progress=False)
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 5))
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-6)
    np.testing.assert_allclose(resumed, fresh, rtol=1e-6)
