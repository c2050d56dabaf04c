"""Mosaic (TPU) kernels (dense, sparse, KIVI, QJL) in TPU interpret mode vs the float64 numpy
oracles of kernels_numpy_reference; the KIVI/QJL kernels also lower to Mosaic (CPU) and pass the
interpreter's race detector."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_numpy_reference import attention, make_kivi, make_qjl, qjl_estimate
from pallas_kernels.reference import NEG_INF
from pallas_kernels.tpu.dense_decode import dense_decode as tpu_dense
from pallas_kernels.tpu.kivi_decode import kivi_decode as tpu_kivi
from pallas_kernels.tpu.qjl_scores import qjl_scores as tpu_qjl


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


# ----------------------------------------------------------------------------- KIVI and QJL (Mosaic)

KIVI_NAMES = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_resid", "v_resid",
              "k_len", "v_len", "lengths"]
QJL_NAMES = ["key_signs", "key_out_signs", "key_norms", "key_out_norms", "outlier_idx", "sketch"]


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("kb,vb,g,dtype", [(4, 4, 1, np.float32), (2, 2, 3, jnp.bfloat16),
                                           (4, 2, 4, np.float32)])
def test_tpu_kivi_matches_numpy(kb, vb, g, dtype):
    rng = np.random.default_rng(10 * kb + vb)
    b, hkv, d, gs, r, capq = 3, 2, 32, 8, 16, 80   # capq 80 -> padded to 96 for block_k 32
    # empty head, 1-token head, lengths off the block grid, only fp tokens (16 = R), fp tail
    lengths = np.array([[0, 1], [45, 93], [70, 16]])
    starts = np.array([[0, 0], [5, 85], [40, 3]], np.int32)   # 85: inside the fp key tail
    arr, kt, vt = make_kivi(rng, b, hkv, d, kb, gs, r, capq, lengths, dtype_np=dtype, v_bits=vb)
    for i in range(b):   # dead slots hold garbage: NaN / inf stats and residual rows
        for h in range(hkv):
            kl, vl, n = arr["k_len"][i, h], arr["v_len"][i, h], lengths[i, h]
            arr["k_scale"][i, h, kl // gs:] = np.nan
            arr["v_min"][i, h, vl:] = np.inf
            arr["k_resid"][i, h, n - kl:] = np.nan
            arr["v_resid"][i, h, n - vl:] = np.nan
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), dtype)
    got = tpu_kivi(q, *[jnp.asarray(arr[n]) for n in KIVI_NAMES], jnp.asarray(starts), bits=kb,
                   v_bits=vb, group_size=gs, block_k=32, interpret=True)
    assert got.dtype == q.dtype and got.shape == q.shape
    got = _f64(got)
    t = np.arange(kt.shape[2])[None]
    want = np.stack([attention(_f64(q)[i], kt[i], vt[i],
                               (t < lengths[i][:, None]) & (t >= starts[i][:, None]), d ** -0.5)
                     for i in range(b)])
    assert np.isfinite(got).all() and np.all(got[0, :g] == 0)
    tol = 1e-4 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_tpu_kivi_general_k_len_v_len():
    """k_len / v_len anywhere (v_len > k_len, k_len off the G grid): the contract's token rule."""
    import pallas_kernels
    rng = np.random.default_rng(7)
    hkv, g, d, gs, capq, r = 4, 2, 32, 8, 64, 24
    # codes for all 64 tokens (k) and 56 (v), then relabel the segments per head
    arr, kt, vt = make_kivi(rng, 1, hkv, d, 4, gs, 8, capq, np.full((1, hkv), capq), v_bits=2)
    k_len = np.array([[20, 45, 3, 64]], np.int32)
    v_len = np.array([[45, 20, 13, 40]], np.int32)
    lengths = np.array([[40, 44, 27, 64]], np.int32)
    starts = np.array([[2, 0, 0, 33]], np.int32)
    k_res = rng.standard_normal((1, hkv, r, d)).astype(np.float32)
    v_res = rng.standard_normal((1, hkv, r, d)).astype(np.float32)
    for h in range(hkv):   # residual rows past the live tail hold garbage
        k_res[0, h, max(lengths[0, h] - k_len[0, h], 0):] = np.nan
        v_res[0, h, max(lengths[0, h] - v_len[0, h], 0):] = np.nan
    arr.update(k_len=k_len, v_len=v_len, lengths=lengths, k_resid=k_res, v_resid=v_res)
    q = rng.standard_normal((1, hkv * g, d)).astype(np.float32)
    got = np.asarray(pallas_kernels.kivi_decode(     # through the dispatcher
        jnp.asarray(q), *[jnp.asarray(arr[n]) for n in KIVI_NAMES], jnp.asarray(starts), bits=4,
        v_bits=2, group_size=gs, block_k=32, impl="tpu", interpret=True), np.float64)
    n = int(lengths.max())
    keys = np.zeros((hkv, n, d))
    vals = np.zeros((hkv, n, d))
    for h in range(hkv):
        for t in range(lengths[0, h]):
            keys[h, t] = kt[0, h, t] if t < k_len[0, h] else k_res[0, h, t - k_len[0, h]]
            vals[h, t] = vt[0, h, t] if t < v_len[0, h] else v_res[0, h, t - v_len[0, h]]
    t = np.arange(n)[None]
    want = attention(q[0].astype(np.float64), keys, vals,
                     (t < lengths[0][:, None]) & (t >= starts[0][:, None]), d ** -0.5)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)


def test_tpu_kivi_errors():
    rng = np.random.default_rng(0)
    arr, _, _ = make_kivi(rng, 1, 1, 32, 4, 8, 16, 32, np.array([[20]]))
    q = jnp.zeros((1, 2, 32), jnp.float32)
    args = [jnp.asarray(arr[n]) for n in KIVI_NAMES]
    with pytest.raises(ValueError, match="bits"):
        tpu_kivi(q, *args, bits=3, group_size=8, interpret=True)
    with pytest.raises(ValueError, match="bits"):   # v_bits 2 but codes packed at 4 bits
        tpu_kivi(q, *args, bits=4, v_bits=2, group_size=8, interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        tpu_kivi(q, *args, bits=4, group_size=8, block_k=40, interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        tpu_kivi(jnp.zeros((1, 2, 16)), *args, bits=4, group_size=8, interpret=True)


@pytest.mark.parametrize("g", [1, 3, 4])
def test_tpu_qjl_matches_numpy(g):
    rng = np.random.default_rng(g)
    b, hkv, cap, d, m, m_out, gs, n_out = 2, 2, 256, 32, 64, 32, 16, 4   # 2 blocks of 128
    arr, _, s, si, so = make_qjl(rng, b, hkv, cap, d, m, m_out, gs, n_out)
    arr["outlier_idx"][1, 0, 1, 2] = arr["outlier_idx"][1, 0, 1, 0]   # repeated index = one channel
    q = rng.standard_normal((b, hkv * g, d)).astype(np.float32)
    lengths = np.array([[0, 1], [133, 256]], np.int32)
    for i in range(b):   # dead slots hold garbage
        for h in range(hkv):
            arr["key_norms"][i, h, lengths[i, h]:] = np.nan
    got = np.asarray(tpu_qjl(jnp.asarray(q), *[jnp.asarray(arr[n]) for n in QJL_NAMES],
                             jnp.asarray(lengths), group_size=gs, block_t=128, interpret=True))
    assert got.shape == (b, hkv * g, cap) and got.dtype == np.float32
    norms, onorms = arr["key_norms"].astype(np.float64), arr["key_out_norms"].astype(np.float64)
    for i in range(b):
        want = qjl_estimate(q[i].astype(np.float64), si[i], so[i], norms[i], onorms[i],
                            arr["outlier_idx"][i], s, gs)
        for h in range(hkv * g):
            n = lengths[i, h // g]
            assert np.all(got[i, h, n:] == NEG_INF)
            np.testing.assert_allclose(got[i, h, :n], want[h, :n], atol=1e-4, rtol=1e-4)


def test_tpu_qjl_errors():
    arr, _, _, _, _ = make_qjl(np.random.default_rng(0), 1, 1, 32, 16, 32, 16, 16, 2)
    args = [jnp.asarray(arr[n]) for n in QJL_NAMES]
    q = jnp.zeros((1, 2, 16), jnp.float32)
    lens = jnp.full((1, 1), 5, jnp.int32)
    with pytest.raises(ValueError, match="group_size"):
        tpu_qjl(q, *args, lens, group_size=24, interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        tpu_qjl(jnp.zeros((1, 2, 8)), *args, lens, group_size=16, interpret=True)
    with pytest.raises(ValueError, match="lengths"):
        tpu_qjl(q, *args, jnp.full((2, 1), 5, jnp.int32), group_size=16, interpret=True)
    with pytest.raises(ValueError, match="block_t"):
        tpu_qjl(q, *args, lens, group_size=16, block_t=0, interpret=True)


def test_f16_bits_decode_all_finite_halves():
    from pallas_kernels.tpu.common import f16_bits_to_f32
    bits = np.arange(1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16)
    fin = np.isfinite(halves)
    got = np.asarray(f16_bits_to_f32(jnp.asarray(bits.view(np.int16))))
    np.testing.assert_array_equal(got[fin], halves[fin].astype(np.float32))


def test_tpu_kernels_lower_to_mosaic():
    """Every TPU kernel lowers to a Mosaic custom call (lowering_platforms=tpu runs on CPU; the
    Mosaic compiler itself only runs on a TPU, so layout errors would not show here)."""
    import jax
    from pallas_kernels import KERNELS, resolve
    for name in KERNELS:
        fn, is_kernel = resolve(name, "tpu")
        assert is_kernel and fn.__module__ == f"pallas_kernels.tpu.{name}"

    def lower(fn, *args):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text

    rng = np.random.default_rng(0)
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    for kb, vb in ((4, 4), (2, 2), (4, 2)):
        arr, _, _ = make_kivi(rng, 1, 2, 128, kb, 32, 128, 256, np.array([[200, 300]]), v_bits=vb)
        lower(lambda *a: tpu_kivi(*a, bits=kb, v_bits=vb, group_size=32), q,
              *[jnp.asarray(arr[n]) for n in KIVI_NAMES])
    arr, _, _, _, _ = make_qjl(rng, 1, 2, 256, 128, 256, 256, 32, 8)
    lower(lambda *a: tpu_qjl(*a, group_size=32), q, *[jnp.asarray(arr[n]) for n in QJL_NAMES],
          jnp.full((1, 2), 50, jnp.int32))


def test_tpu_kivi_qjl_race_free():
    """The interpreter's happens-before race detector (DMAs run at their wait, two simulated
    cores) finds no read of a buffer slot whose copy is still in flight."""
    ipc = pytest.importorskip("jax._src.pallas.mosaic.interpret.interpret_pallas_call")
    from jax.experimental.pallas import tpu as pltpu
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    rng = np.random.default_rng(5)
    arr, _, _ = make_kivi(rng, 1, 2, 32, 2, 8, 16, 96, np.array([[45, 93]]))
    q = jnp.asarray(rng.standard_normal((1, 4, 32)), jnp.float32)
    out = tpu_kivi(q, *[jnp.asarray(arr[n]) for n in KIVI_NAMES], bits=2, group_size=8,
                   block_k=32, interpret=params)
    assert np.isfinite(np.asarray(out)).all() and not ipc.races.races_found
    arr, _, _, _, _ = make_qjl(rng, 1, 2, 64, 32, 64, 32, 16, 4)
    out = tpu_qjl(q, *[jnp.asarray(arr[n]) for n in QJL_NAMES], jnp.asarray([[20, 64]], jnp.int32),
                  group_size=16, block_t=32, interpret=params)
    assert np.asarray(out).shape == (1, 4, 64) and not ipc.races.races_found
