"""Fused KIVI 2/4-bit decode kernel (interpret mode) vs float64 numpy attention over the
dequantised cache built from the layout contract (kvjax/quant/LAYOUT.md)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_numpy_reference import attention, make_kivi
from pallas_kernels import reference
from pallas_kernels.gpu.kivi_decode import kivi_decode as gpu_kivi

ORDER = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_resid", "v_resid",
         "k_len", "v_len", "lengths"]


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("bits,v_bits,g,d,gps,splits,variant", [
    (4, 4, 3, 64, None, 1, "stacked"), (2, 2, 4, 64, 8, 2, "stacked"),
    (4, 4, 3, 64, 1, 1, "dequant"), (2, 2, 4, 64, 2, 2, "dequant"),
    (4, 2, 8, 64, None, 3, "dequant"), (2, 4, 1, 64, 4, None, "dequant")])
def test_kivi_kernel_matches_numpy(bits, v_bits, g, d, gps, splits, variant):
    rng = np.random.default_rng(bits * 10 + g)
    b, hkv, group, r, capq = 2, 2, 16, 32, 64
    # empty head, 1 token (all fp), odd length with quantised K+V and both fp segments, full
    lengths = np.array([[0, 1], [53, capq + r - 3]])
    arr, kt, vt = make_kivi(rng, b, hkv, d, bits, group, r, capq, lengths, v_bits=v_bits)
    starts = np.array([[0, 0], [5, 0]], np.int32)  # left padding on one head
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    args = [q] + [jnp.asarray(arr[n]) for n in ORDER]
    args[7] = args[7].astype(jnp.bfloat16)
    args[8] = args[8].astype(jnp.bfloat16)
    # the residual arrays were rounded to bf16 above: rebuild the fp part of the oracle from them
    kr, vr = _f64(args[7]), _f64(args[8])
    for i in range(b):
        for h in range(hkv):
            n, kl, vl = lengths[i, h], arr["k_len"][i, h], arr["v_len"][i, h]
            kt[i, h, kl:n] = kr[i, h, :n - kl]
            vt[i, h, vl:n] = vr[i, h, :n - vl]
    t = np.arange(kt.shape[2])[None]
    want = np.stack([attention(_f64(q)[i], kt[i], vt[i],
                               (t < lengths[i][:, None]) & (t >= starts[i][:, None]), d ** -0.5)
                     for i in range(b)])
    got = _f64(gpu_kivi(*args, jnp.asarray(starts), bits=bits, v_bits=v_bits, group_size=group,
                        num_splits=splits,
                        tile_groups=gps, variant=variant, interpret=True))
    assert np.isfinite(got).all() and np.all(got[0, :g] == 0)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    ref = _f64(reference.kivi_decode(*args, jnp.asarray(starts), bits=bits, v_bits=v_bits,
                                     group_size=group))
    # the dispatcher (CPU -> reference; interpret -> GPU kernel) computes the same
    import pallas_kernels
    via = _f64(pallas_kernels.kivi_decode(*args, jnp.asarray(starts), bits=bits, v_bits=v_bits,
                                          group_size=group))
    np.testing.assert_allclose(via, ref, atol=1e-6)
    np.testing.assert_allclose(ref, want, atol=2e-2, rtol=2e-2)


def test_kivi_errors():
    rng = np.random.default_rng(0)
    arr, _, _ = make_kivi(rng, 1, 1, 32, 2, 16, 32, 64, np.array([[40]]))
    q = jnp.zeros((1, 2, 32), jnp.bfloat16)
    args = [q] + [jnp.asarray(arr[n]) for n in ORDER]
    with pytest.raises(ValueError, match="bits"):
        gpu_kivi(*args, bits=3, group_size=16, interpret=True)
    with pytest.raises(ValueError, match="group_size"):
        gpu_kivi(*args, bits=2, group_size=24, interpret=True)
    with pytest.raises(ValueError, match="codes"):
        gpu_kivi(*args, bits=4, group_size=16, interpret=True)
    with pytest.raises(ValueError, match="variant"):
        gpu_kivi(*args, bits=2, group_size=16, variant="fused", interpret=True)
    arr, _, _ = make_kivi(rng, 1, 1, 64, 2, 16, 32, 64, np.array([[40]]))
    args = [q[..., :1].repeat(64, axis=-1)] + [jnp.asarray(arr[n]) for n in ORDER]
    with pytest.raises(ValueError, match="tile_groups"):
        gpu_kivi(*args, bits=2, group_size=16, tile_groups=3, interpret=True)
