"""NSA selected-block attention kernels (GPU Pallas-Triton, TPU Pallas-Mosaic) in interpret mode
against the jnp reference `models.nsa.selected_attention` (itself checked against float64 numpy
in test_nsa.py), their lowering, and their input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.nsa import NSAConfig, select_blocks, selected_attention
from pallas_kernels.gpu.nsa_select import nsa_select as gpu_select
from pallas_kernels.tpu.nsa_select import nsa_select as tpu_select

CFG = NSAConfig(kernel_size=16, kernel_stride=8, block_size=16, top_n=3, init_blocks=1, local_blocks=1)


def _case(T=53, hkv=2, g=3, d=16, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(1, hkv * g, T, d)), dtype)
    k = jnp.asarray(r.normal(size=(1, hkv, T, d)), dtype)
    v = jnp.asarray(r.normal(size=(1, hkv, T, d)), dtype)
    scores = jnp.asarray(r.random(size=(1, hkv, T, CFG.n_selection_blocks(T))), jnp.float32)
    idx, counts = select_blocks(scores, jnp.arange(T), CFG)
    return q, k, v, idx, counts


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_selection_kernel_matches_reference(impl):
    q, k, v, idx, counts = _case()                      # 53 tokens: 4 blocks, the last one partial
    assert (np.asarray(counts) == 3).any() and (np.asarray(counts) < 3).any()
    want = np.asarray(selected_attention(q, k, v, idx, 16, 0.3))
    fn = gpu_select if impl == "gpu" else tpu_select
    got = np.asarray(fn(q, k, v, idx, counts, block_size=16, scale=0.3, interpret=True))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-5, err
    if impl == "tpu":
        return
    # bfloat16 inputs: compared with the reference on the same (rounded) inputs
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    want = np.asarray(selected_attention(qb, kb, vb, idx, 16, 0.3))
    got = np.asarray(fn(qb, kb, vb, idx, counts, block_size=16, scale=0.3, interpret=True), np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_selection_kernels_lower():
    q = jnp.zeros((1, 12, 256, 128), jnp.bfloat16)
    k = jnp.zeros((1, 4, 256, 128), jnp.bfloat16)
    idx = jnp.zeros((1, 4, 256, 16), jnp.int32)
    counts = jnp.full((1, 4, 256), 3, jnp.int32)
    try:
        text = jax.jit(lambda *a: gpu_select(*a, block_size=64)).trace(q, k, k, idx, counts).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()
    except Exception as e:  # jax >= 0.11 needs a GPU device to lower for cuda
        if "No supported GPU devices found" not in str(e):
            raise
    text = jax.jit(lambda *a: tpu_select(*a, block_size=64)).trace(q, k, k, idx, counts).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_selection_kernel_errors():
    q, k, v, idx, counts = _case(T=20)
    with pytest.raises(ValueError, match="power of two"):
        gpu_select(q, k, v, idx, counts, block_size=24)
    with pytest.raises(ValueError, match="multiple of 8"):
        tpu_select(q, k, v, idx, counts, block_size=12)
    with pytest.raises(ValueError, match="indices must be"):
        gpu_select(q, k, v, idx[:, :1], counts, block_size=16)
    with pytest.raises(ValueError, match="does not divide"):
        gpu_select(q[:, :5], k, v, idx, counts, block_size=16)
    with pytest.raises(ValueError, match="counts must be"):
        tpu_select(q, k, v, idx, counts[..., :3], block_size=16)


# the backward cases share shapes, scale (head_dim ** -0.5) and block sizes so that the
# interpret-mode kernels compile once for both tests
BWD = NSAConfig(kernel_size=16, kernel_stride=8, block_size=16, top_n=2, init_blocks=1, local_blocks=1)


def _bwd_case(seed):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(1, h, 37, 16)), jnp.float32) for h in (3, 1, 1))
    idx, counts = select_blocks(jnp.asarray(r.random(size=(1, 1, 37, 3)), jnp.float32), jnp.arange(37), BWD)
    return q, k, v, idx, counts


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_selection_backward_matches_grad_of_reference(impl):
    """custom_vjp (kernel forward + dq / dk-dv kernels) vs jax.grad of the jnp reference, at an
    odd length (37: last key block and last query tile partial), GQA 3, top-2 of 3 blocks (tokens
    of block 2 skip block 1), a random cotangent."""
    if impl == "gpu":
        from pallas_kernels.gpu.nsa_select_bwd import nsa_select_trainable as op
    else:
        from pallas_kernels.tpu.nsa_select_bwd import nsa_select_trainable as op
    q, k, v, idx, counts = _bwd_case(5)
    assert not (np.asarray(idx)[0, 0, 32:] == 1).any()
    w = jnp.asarray(np.random.default_rng(6).normal(size=q.shape), jnp.float32)
    ref = lambda q, k, v: jnp.sum(selected_attention(q, k, v, idx, 16, 0.25) * w)
    ker = lambda q, k, v: jnp.sum(op(q, k, v, idx, counts, 16, 0.25, 16, True).astype(jnp.float32) * w)
    want = jax.jit(jax.grad(ref, (0, 1, 2)))(q, k, v)
    got = jax.jit(jax.grad(ker, (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert err < 1e-5, (name, err)


def test_train_select_fn_gradients_equal_reference():
    """train.nsa's --attention interpret hook: gradients of the whole NSA attention (three branches,
    gates, compressor) through the kernel op equal those of the pure-jnp path."""
    from models.config import ModelConfig
    from models.nsa import init_nsa_params, nsa_attention
    from train.nsa import select_fn_for
    cfg = ModelConfig(name="t", vocab_size=8, d_model=16, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=16,
                      ffn_dim=16)
    q, k, v, _, _ = _bwd_case(7)
    h = jnp.asarray(np.random.default_rng(8).normal(size=(1, 37, 16)), jnp.float32)
    lp = init_nsa_params(cfg, BWD, jax.random.PRNGKey(0), noise=0.2)[0]
    fn = select_fn_for("interpret", block_q=16)

    def loss(lp, q, k, v, select_fn):
        return jnp.sum(nsa_attention(q, k, k, v, h, lp, BWD, cfg, select_fn) ** 2)
    grad = jax.jit(jax.grad(loss, (0, 1, 2, 3)), static_argnums=4)
    want, got = grad(lp, q, k, v, None), grad(lp, q, k, v, fn)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(b)) + 1e-12
    with pytest.raises(ValueError, match="attention must be"):
        select_fn_for("cuda")
