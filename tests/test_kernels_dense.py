"""Dense split-K and token-sparse decode kernels (interpret mode) vs float64 numpy attention."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from kernels_numpy_reference import attention
from pallas_kernels import reference
from pallas_kernels.gpu.dense_decode import dense_decode as gpu_dense
from pallas_kernels.gpu.sparse_decode import sparse_decode as gpu_sparse

TOL = 2e-2  # bf16 inputs/outputs, bf16 tensor-core operands


def _np_dense(q, k, v, lengths, starts):
    b, _, cap, d = k.shape
    out = []
    for i in range(b):
        t = np.arange(cap)[None]
        valid = (t < lengths[i][:, None]) & (t >= starts[i][:, None])
        out.append(attention(q[i], k[i], v[i], valid, d ** -0.5))
    return np.stack(out)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("g,cap,d,block_k,splits", [(1, 40, 32, 16, None), (3, 64, 64, 16, 3),
                                                    (4, 37, 32, 32, 1), (8, 48, 16, 16, 2)])
def test_dense_kernel_matches_numpy(g, cap, d, block_k, splits):
    rng = np.random.default_rng(g * 100 + cap)
    b, hkv = 2, 2
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    # empty head, 1-token head, odd length, full head
    lengths = np.array([[0, 1], [cap // 2 + 1 | 1, cap]], np.int32)
    starts = np.array([[0, 0], [3, 0]], np.int32)
    want = _np_dense(_f64(q), _f64(k), _f64(v), lengths, starts)
    got = _f64(gpu_dense(q, k, v, jnp.asarray(lengths), jnp.asarray(starts), block_k=block_k,
                         num_splits=splits, interpret=True))
    assert np.isfinite(got).all()
    assert np.all(got[0, :g] == 0.0)  # empty head -> zeros, not NaN
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    ref = _f64(reference.dense_decode(q, k, v, jnp.asarray(lengths), jnp.asarray(starts)))
    np.testing.assert_allclose(ref, want, atol=TOL, rtol=TOL)


def test_dense_dispatch_and_errors():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 4, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 2, 16, 32)), jnp.float32)
    lengths = jnp.asarray([[5, 16]], jnp.int32)
    # on CPU the default is the XLA reference
    want = _np_dense(_f64(q), _f64(k), _f64(k), np.asarray(lengths), np.zeros((1, 2), np.int32))
    np.testing.assert_allclose(_f64(pallas_kernels.dense_decode(q, k, k, lengths)), want, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        gpu_dense(q[:, :3], k, k, lengths, interpret=True)
    with pytest.raises(ValueError, match="lengths"):
        gpu_dense(q, k, k, lengths[:, :1], interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        gpu_dense(q, k, k, lengths, block_k=24, interpret=True)
    with pytest.raises(ValueError, match="impl"):
        pallas_kernels.dense_decode(q, k, k, lengths, impl="cuda")


@pytest.mark.parametrize("g", [1, 4])
def test_sparse_kernel_matches_numpy(g):
    rng = np.random.default_rng(7 + g)
    b, hkv, cap, d, n = 2, 2, 96, 32, 40
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, hkv, cap, d)), jnp.bfloat16)
    idx = np.stack([np.stack([rng.choice(cap, n, replace=False) for _ in range(hkv)])
                    for _ in range(b)]).astype(np.int32)
    counts = np.array([[0, 1], [17, n]], np.int32)
    got = _f64(gpu_sparse(q, k, v, jnp.asarray(idx), jnp.asarray(counts), block_k=16, interpret=True))
    kn, vn = _f64(k), _f64(v)
    want = np.stack([attention(_f64(q)[i], np.stack([kn[i, h, idx[i, h]] for h in range(hkv)]),
                               np.stack([vn[i, h, idx[i, h]] for h in range(hkv)]),
                               np.arange(n)[None] < counts[i][:, None], d ** -0.5) for i in range(b)])
    assert np.isfinite(got).all() and np.all(got[0, :g] == 0)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    ref = _f64(reference.sparse_decode(q, k, v, jnp.asarray(idx), jnp.asarray(counts)))
    np.testing.assert_allclose(ref, want, atol=TOL, rtol=TOL)


def test_resolve_backends():
    from pallas_kernels.tpu.dense_decode import dense_decode as tpu_dense
    fn, is_kernel = pallas_kernels.resolve("dense_decode", "tpu")
    assert fn is tpu_dense and is_kernel
    fn, is_kernel = pallas_kernels.resolve("dense_decode", None, interpret=True)
    assert fn is gpu_dense and is_kernel
    assert pallas_kernels.resolve("qjl_scores", "reference") == (reference.qjl_scores, False)
    for name in pallas_kernels.KERNELS:  # every kernel has a TPU (Mosaic) implementation
        fn, is_kernel = pallas_kernels.resolve(name, "tpu")
        assert is_kernel and fn.__module__ == f"pallas_kernels.tpu.{name}"
    with pytest.raises(ValueError, match="impl must be"):
        pallas_kernels.resolve("kivi_decode", "cuda")
    with pytest.raises(ValueError, match="unknown kernel"):
        pallas_kernels.resolve("flash", None)
