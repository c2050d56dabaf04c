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
