"""Gated Attention (models/gated_attention.py, train/gated_attention.py): the gated forward vs the
independent float64 numpy forward (tests/numpy_reference.py), the exact conversion, the LM loss and
its finite-difference gradient, training/resume/export/reload and errors. Spec §9 of
eviction_merging_learned.md."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.gated_attention import convert, gates_of, split_fused_q_proj
from models.llama import init_params, unstack_params
from tests.numpy_reference import reference_logits
from train.gated_attention import (GatedTrainConfig, attention_stats, lm_logits, load_gates, make_loss, run,
                                   with_gates)
from train.loop import TrainConfig

TINY = ModelConfig(name="tiny-locret", vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, ffn_dim=64, tie_embeddings=True)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _gated(config, kind, seed=1, scale=0.4):
    params = init_params(config, jax.random.PRNGKey(0), scale=0.3, stacked=True)
    gated, gp = convert(params, config, kind)
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    gates = {n: scale * jax.random.normal(k, gp["layers"][n].shape) for k, n in zip(keys, gates_of(gp))}
    return params, gated, with_gates(gp, gates)


@pytest.mark.parametrize("kind,bias", [("elementwise", False), ("headwise", True)])
def test_gated_forward_matches_float64_reference(kind, bias):
    """Gated logits = numpy float64 forward with out_head * sigmoid(h W (+ b)); zero gates (the
    conversion) = the original model exactly (o_proj doubled, sigmoid(0) = 1/2)."""
    config = dataclasses.replace(TINY, qkv_bias=bias)
    params, gated, gp = _gated(config, kind)
    toks = np.random.default_rng(0).integers(0, 256, 23)
    got = np.asarray(lm_logits(gp, jnp.asarray(toks, jnp.int32)[None], gated)[0], np.float64)
    want = reference_logits(gp, gated, toks)
    plain = reference_logits(params, config, toks)
    assert _rel(got, want) < 1e-5 and _rel(want, plain) > 1e-2         # the gate changes the function
    _, zero = convert(params, config, kind)
    np.testing.assert_allclose(reference_logits(zero, gated, toks), plain, rtol=1e-10, atol=1e-10)


def test_generate_and_nnx_with_gate():
    """The engine (per-layer cache, decode loop) runs the gated model: its greedy tokens are the
    float64 reference's argmax continuation; the NNX Llama owns the gate Params and calls the same math."""
    from flax import nnx
    import kvjax
    from models.nnx_llama import Llama, from_params, params_of
    _, gated, gp = _gated(TINY, "elementwise")
    prompt = list(np.random.default_rng(3).integers(0, 256, 9))
    out = kvjax.generate(unstack_params(gp), gated, [prompt], max_new_tokens=4, attention="xla")
    seq = list(prompt)
    for _ in range(4):
        seq.append(int(np.argmax(reference_logits(gp, gated, np.asarray(seq), at=[len(seq) - 1])[0])))
    assert list(out.tokens[0]) == seq[len(prompt):]
    model = Llama(gated, rngs=nnx.Rngs(0))
    assert model.layers[0].w_attn_gate.get_value().shape == (32, 32)
    m2 = from_params(gated, gp)
    toks = jnp.asarray(prompt, jnp.int32)[None]
    np.testing.assert_allclose(np.asarray(lm_logits(params_of(m2), toks, gated)),
                               np.asarray(lm_logits(gp, toks, gated)), rtol=1e-6, atol=1e-6)


def test_loss_and_gradient_match_reference():
    """loss = mean next-token CE of the float64 gated forward; d loss / d gate = central differences;
    the gradient pytree is the gate pytree (nothing else is differentiated)."""
    params, gated, gp = _gated(TINY, "headwise", scale=0.6)
    gates = gates_of(gp)
    frozen = {**gp, "layers": {k: v for k, v in gp["layers"].items() if k not in gates}}
    cfg = GatedTrainConfig(model="tiny", kind="headwise", train=TrainConfig(dtype="float32"))
    toks = np.random.default_rng(4).integers(0, 256, 18)
    batch = {"tokens": jnp.asarray(toks[:-1], jnp.int32)[None], "targets": jnp.asarray(toks[1:], jnp.int32)[None]}

    def ref_loss(g):
        logits = reference_logits(with_gates(frozen, {"w_attn_gate": g}), gated, toks[:-1])
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        return -logp[np.arange(17), toks[1:]].mean()

    loss_fn = jax.jit(make_loss(gated, cfg))
    (loss, _), grad = jax.value_and_grad(loss_fn, has_aux=True)(gates, frozen, batch)
    w = np.asarray(gates["w_attn_gate"], np.float64)
    np.testing.assert_allclose(float(loss), ref_loss(w), rtol=1e-5)
    assert set(grad) == {"w_attn_gate"}
    eps = 1e-3
    for idx in [(0, 3, 1), (1, 17, 2), (1, 0, 3)]:
        d = np.zeros_like(w)
        d[idx] = eps
        fd = (ref_loss(w + d) - ref_loss(w - d)) / (2 * eps)
        np.testing.assert_allclose(float(grad["w_attn_gate"][idx]), fd, rtol=2e-2, atol=1e-6)


def test_training_resume_export_reload(tmp_path):
    """A run whose last checkpoint (step 4) is lost resumes from step 2 and ends as the uninterrupted
    run (losses, gates: the data and the schedule are functions of the step); the loss falls; the
    export reloads to the same logits; gates of another model are refused; attention_stats' sink
    mass and activations match closed forms."""
    import shutil
    tiny = (("d_model", 32), ("ffn_dim", 64), ("head_dim", 8), ("n_heads", 4), ("n_kv_heads", 2),
            ("n_layers", 2), ("scale", 0.3), ("vocab_size", 256))
    cfg = GatedTrainConfig(model="tiny", tiny=tiny, seq_len=48, train=TrainConfig(
        steps=4, lr=0.05, warmup_steps=0, dtype="float32", ckpt_every=2, log_every=1, clip_value=1.0))
    summary, fresh = run(cfg, tmp_path / "a", progress=False)
    lb = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(tmp_path / "a" / "ckpt" / "4")                      # as if killed before the step-4 save
    _, resumed = run(cfg, tmp_path / "a", progress=False)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    np.testing.assert_allclose(resumed["w_attn_gate"], fresh["w_attn_gate"], rtol=1e-6)
    assert summary["final"]["loss"] < summary["first"]["loss"]
    params = init_params(TINY, jax.random.PRNGKey(0), scale=0.3)
    kind, gates = load_gates(tmp_path / "a", TINY)
    gated, gp = convert(params, TINY, kind, gates)
    toks = np.random.default_rng(5).integers(0, 256, 16)
    np.testing.assert_allclose(np.asarray(lm_logits(gp, jnp.asarray(toks, jnp.int32)[None], gated)[0]),
                               reference_logits({**gp, "layers": {k: jnp.stack([lp[k] for lp in gp["layers"]])
                                                                  for k in gp["layers"][0]}}, gated, toks),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="trained for model"):
        load_gates(tmp_path / "a", dataclasses.replace(TINY, name="other"))
    with pytest.raises(FileNotFoundError, match="not a Gated Attention export"):
        load_gates(tmp_path, TINY)
    # sink mass: with wq = 0 every query attends uniformly, so key 0 gets 1 / (i + 1) at query i;
    # the largest activation of layer 0's input is the largest |embedding| of the tokens
    flat = {**gp, "layers": tuple({**lp, "wq": jnp.zeros_like(lp["wq"])} for lp in gp["layers"])}
    stats = attention_stats(flat, gated, toks)
    np.testing.assert_allclose(stats["sink_mass"], np.mean(1.0 / np.arange(2, 17)), rtol=1e-5)
    np.testing.assert_allclose(stats["max_activation_per_layer"][0], np.abs(np.asarray(gp["embed"])[toks]).max(),
                               rtol=1e-6)


def test_errors_and_fused_layout():
    with pytest.raises(ValueError, match="attn_gate"):
        dataclasses.replace(TINY, attn_gate="sigmoid")
    gated = dataclasses.replace(TINY, attn_gate="elementwise")
    params = init_params(TINY, jax.random.PRNGKey(0), stacked=True)
    with pytest.raises(ValueError, match="no w_attn_gate"):
        lm_logits(params, jnp.zeros((1, 4), jnp.int32), gated)
    with pytest.raises(ValueError, match="already has"):
        convert(convert(params, TINY)[1], gated)
    with pytest.raises(ValueError, match="needs"):
        convert(params, TINY, "headwise", {"w_attn_gate": jnp.zeros((2, 32, 32))})
    with pytest.raises(ValueError, match="kind"):
        GatedTrainConfig(kind="channel")
    # official fused q_proj: per kv group [G*d query | G*d gate] -> ours head-major
    d, g, hd = 32, 2, 8
    fused = np.arange(d * 2 * (2 * g * hd), dtype=np.float64).reshape(d, 2, 2 * g * hd)
    wq, wg = split_fused_q_proj(fused.reshape(d, -1), TINY, "elementwise")
    for kv in range(2):
        np.testing.assert_array_equal(wq[:, kv * g * hd:(kv + 1) * g * hd], fused[:, kv, :g * hd])
        np.testing.assert_array_equal(wg[:, kv * g * hd:(kv + 1) * g * hd], fused[:, kv, g * hd:])
    with pytest.raises(ValueError, match="fused q_proj"):
        split_fused_q_proj(fused[:, :, :-1].reshape(d, -1), TINY, "elementwise")
