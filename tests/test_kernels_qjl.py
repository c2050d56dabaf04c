"""QJL score kernel (interpret mode) vs a float64 per-token numpy estimator."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_numpy_reference import make_qjl, qjl_estimate
from pallas_kernels import reference
from pallas_kernels.gpu.qjl_scores import qjl_scores as gpu_qjl


@pytest.mark.parametrize("g,precise", [(3, True), (4, False)])
def test_qjl_kernel_matches_numpy(g, precise):
    rng = np.random.default_rng(g)
    b, hkv, cap, d, m, mo, group = 2, 2, 96, 32, 128, 128, 32
    arr, keys, s, si, so = make_qjl(rng, b, hkv, cap, d, m, mo, group, 4)
    lengths = np.array([[0, 1], [50, cap]], np.int32)
    if not precise:  # a repeated outlier index counts once (kernel must match the mask semantics)
        arr["outlier_idx"][1, 1, 0, 3] = arr["outlier_idx"][1, 1, 0, 1]
        m_ = np.zeros(d)
        m_[arr["outlier_idx"][1, 1, 0]] = 1
        kg = keys[1, 1, :group]
        so[1, 1, :group] = np.where((kg * m_) @ s[:, :mo] >= 0, 1, -1)
        si[1, 1, :group] = np.where((kg * (1 - m_)) @ s >= 0, 1, -1)
        arr["key_out_norms"][1, 1, :group] = np.linalg.norm(kg * m_, axis=1)
        from kernels_numpy_reference import pack_signs
        arr["key_signs"][1, 1, :group] = pack_signs(si[1, 1, :group])
        arr["key_out_signs"][1, 1, :group] = pack_signs(so[1, 1, :group])
    q = rng.standard_normal((b, hkv * g, d)).astype(np.float32)
    names = ["key_signs", "key_out_signs", "key_norms", "key_out_norms", "outlier_idx", "sketch"]
    args = [jnp.asarray(q)] + [jnp.asarray(arr[n]) for n in names] + [jnp.asarray(lengths)]
    got = np.asarray(gpu_qjl(*args, group_size=group, groups_per_block=2, precise=precise,
                             interpret=True), np.float64)
    want = np.stack([qjl_estimate(q[i].astype(np.float64), si[i], so[i],
                                  arr["key_norms"][i].astype(np.float64),
                                  arr["key_out_norms"][i].astype(np.float64), arr["outlier_idx"][i],
                                  arr["sketch"].astype(np.float64), group) for i in range(b)])
    valid = np.repeat(np.arange(cap)[None] < lengths[:, :, None], g, axis=1)
    scale = np.abs(want[valid]).max()
    tol = 1e-4 if precise else 1e-2
    np.testing.assert_allclose(got[valid], want[valid], atol=tol * scale)
    assert np.all(got[~valid] <= -1e29)
    ref = np.asarray(reference.qjl_scores(*args, group_size=group), np.float64)
    np.testing.assert_allclose(ref[valid], want[valid], atol=1e-4 * scale)
    # the estimator tracks the true inner products
    true = np.einsum("bhd,bhtd->bht", q, np.repeat(keys, g, axis=1))
    assert np.corrcoef(got[valid], true[valid])[0, 1] > 0.6


def test_qjl_errors():
    rng = np.random.default_rng(0)
    arr, _, _, _, _ = make_qjl(rng, 1, 1, 32, 32, 128, 128, 32, 4)
    names = ["key_signs", "key_out_signs", "key_norms", "key_out_norms", "outlier_idx", "sketch"]
    args = [jnp.zeros((1, 2, 32))] + [jnp.asarray(arr[n]) for n in names] + [jnp.full((1, 1), 32, jnp.int32)]
    with pytest.raises(ValueError, match="group_size"):
        gpu_qjl(*args, group_size=24, interpret=True)
    bad = list(args)
    bad[6] = bad[6][:16]
    with pytest.raises(ValueError, match="head_dim"):
        gpu_qjl(*bad, group_size=32, interpret=True)
