"""Mosaic (TPU) dense decode kernel in TPU interpret mode vs float64 numpy attention."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_numpy_reference import attention
from pallas_kernels.tpu.dense_decode import dense_decode as tpu_dense


@pytest.mark.parametrize("g,cap,block_k", [(1, 40, 16), (4, 64, 32)])
def test_tpu_dense_matches_numpy(g, cap, block_k):
    rng = np.random.default_rng(g)
    b, hkv, d = 2, 2, 32
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    lengths = np.array([[0, 1], [cap - 5, cap]], np.int32)
    starts = np.array([[0, 0], [block_k + 3, 0]], np.int32)
    got = np.asarray(jnp.asarray(tpu_dense(q, k, v, jnp.asarray(lengths), jnp.asarray(starts),
                                           block_k=block_k, interpret=True), jnp.float32), np.float64)
    f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    t = np.arange(cap)[None]
    want = np.stack([attention(f(q)[i], f(k)[i], f(v)[i],
                               (t < lengths[i][:, None]) & (t >= starts[i][:, None]), d ** -0.5)
                     for i in range(b)])
    assert np.isfinite(got).all() and np.all(got[0, :g] == 0)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def test_tpu_dense_errors():
    q = jnp.zeros((1, 2, 32), jnp.bfloat16)
    k = jnp.zeros((1, 1, 32, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_k"):
        tpu_dense(q, k, k, jnp.ones((1, 1), jnp.int32), block_k=20, interpret=True)


def test_tpu_sparse_matches_numpy():
    from pallas_kernels.tpu.sparse_decode import sparse_decode as tpu_sparse
    rng = np.random.default_rng(3)
    b, hkv, g, cap, d, n = 2, 2, 3, 64, 32, 20
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    idx = np.stack([np.stack([rng.choice(cap, n, replace=False) for _ in range(hkv)])
                    for _ in range(b)]).astype(np.int32)
    counts = np.array([[0, 1], [11, n]], np.int32)
    got = np.asarray(jnp.asarray(tpu_sparse(q, k, v, jnp.asarray(idx), jnp.asarray(counts), block_k=8,
                                            interpret=True), jnp.float32), np.float64)
    f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    kn, vn = f(k), f(v)
    want = np.stack([attention(f(q)[i], np.stack([kn[i, h, idx[i, h]] for h in range(hkv)]),
                               np.stack([vn[i, h, idx[i, h]] for h in range(hkv)]),
                               np.arange(n)[None] < counts[i][:, None], d ** -0.5) for i in range(b)])
    assert np.isfinite(got).all() and np.all(got[0, :g] == 0)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
