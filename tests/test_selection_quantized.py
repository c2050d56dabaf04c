"""Selection over a KIVI cache (kvjax.selection.quantized): with metadata from full-precision keys
the selected set equals the dense cache's; decode output over the gathered, dequantized selection
against a float64 simulation (KIVI built and dequantized by the independent numpy oracle); generate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import make_cache_init
from kvjax.quant.kivi import KIVICache
from kvjax.selection import LouisKV, Quest, TokenSelect
from kvjax.selection.base import wrap_layer
from tests.kernels_numpy_reference import make_kivi
from tests.test_selection import B, CFG, D, HKV, HQ, _filled, _np_attend, _np_quest_pages, _update

SELECTORS = [Quest(budget=64, dense_layers=0), LouisKV.from_budget(40, n_local=8, threshold=1.0)]


def _kivi_of(kv):
    """The dense layer's tokens appended to an empty KIVI-4 layer (G 8, R 16) of the same capacity."""
    layer = make_cache_init("kivi4", group=8, residual=16)(CFG, B, kv.capacity)
    layer = jax.tree_util.tree_map(lambda x: x[0], layer)                    # one layer of the stack
    t = int(kv.lengths.max())
    pos = jnp.asarray(kv.positions[:, 0, :t])
    return jax.jit(lambda l, k, v, p: l.append(k, v, p))(layer, kv.keys[:, :, :t], kv.values[:, :, :t], pos)


def _sets(layer):
    idx, ok = np.asarray(layer.state.indices), np.asarray(layer.state.valid)
    return [[set(idx[b, h][ok[b, h]].tolist()) for h in range(HKV)] for b in range(B)]


@pytest.mark.parametrize("sel", SELECTORS, ids=["quest", "louiskv"])
def test_full_precision_metadata_selects_as_the_dense_cache_across_appends(sel):
    kv, *_ = _filled(96, lengths=[90, 90], pad=[0, 5], seed=4)       # the engine's layout: left padding
    kivi = _kivi_of(kv)
    wrap = jax.jit(wrap_layer, static_argnums=(0, 2))
    dense, quant = wrap(sel, kv, CFG), wrap(sel, kivi, CFG, kv)
    rng = np.random.default_rng(5)
    append = jax.jit(lambda layer, new, p: layer.append(new, new, p))
    for step in range(2):
        qpos = jnp.asarray([[90 + step], [85 + step]])
        if step:                                     # a full-precision token appended to both
            new = jnp.asarray(rng.standard_normal((B, HKV, 1, D)), jnp.float32)
            dense, quant = append(dense, new, qpos - 1), append(quant, new, qpos - 1)
        q = jnp.asarray(rng.standard_normal((B, HQ, 1, D)), jnp.float32)
        _, _, dense = _update(dense, q, qpos)
        _, _, quant = _update(quant, q, qpos)
        assert _sets(quant) == _sets(dense), step


def test_decode_over_the_kivi_selection_matches_float64():
    """Quest pages (the newest page straddles codes and residual) and LouisKV tokens over a 2-bit
    KIVI layer whose float64 dequantized K/V come from the numpy oracle."""
    bits = 2
    lengths = np.array([[90, 90], [77, 77]])
    arr, kt, vt = make_kivi(np.random.default_rng(bits), B, HKV, D, bits, 8, 16, 96, lengths)
    kivi = KIVICache(**{k: jnp.asarray(v) for k, v in arr.items()}, pos_offset=jnp.zeros((B, HKV), jnp.int32),
                     k_bits=bits, v_bits=bits, group=8, residual=16)
    pos = np.where(np.arange(96) < lengths[..., None], np.arange(96), -1)
    pad = lambda x: np.pad(x, ((0, 0), (0, 0), (0, 96 - x.shape[2]), (0, 0)))
    kt, vt = pad(kt), pad(vt)
    q = np.random.default_rng(7).standard_normal((B, HQ, D)).astype(np.float32)
    qpos = jnp.asarray([[90], [77]])
    quest = Quest(budget=64, dense_layers=0)
    out, _, layer = _update(jax.jit(wrap_layer, static_argnums=(0, 2))(quest, kivi, CFG),
                            jnp.asarray(q)[:, :, None], qpos)
    for b in range(B):
        n = lengths[b, 0]
        chosen, _ = _np_quest_pages(q[b].astype(np.float64), kt[b], pos[b], n, 16, 3)
        slots = {h: [s for p in chosen[h] for s in range(p * 16, (p + 1) * 16) if s < n] for h in range(HKV)}
        want = _np_attend(q[b].astype(np.float64), kt[b], vt[b], slots)
        np.testing.assert_allclose(np.asarray(out[b, :, 0]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    louis = LouisKV.from_budget(40, n_local=8)
    out, _, layer = _update(jax.jit(wrap_layer, static_argnums=(0, 2))(louis, kivi, CFG),
                            jnp.asarray(q)[:, :, None], qpos)
    for b, sets in enumerate(_sets(layer)):
        n = lengths[b, 0]
        slots = {h: sorted(sets[h] | set(range(n - 8, n))) for h in range(HKV)}
        assert all(len(s) == 40 for s in slots.values())
        want = _np_attend(q[b].astype(np.float64), kt[b], vt[b], slots)
        np.testing.assert_allclose(np.asarray(out[b, :, 0]), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_generate_selection_over_kivi_and_refusals():
    from kvjax.generate import generate
    from models.llama import init_params
    params = init_params(CFG, jax.random.PRNGKey(1), scale=0.3)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 128, 150)), list(rng.integers(1, 128, 120))]
    init = make_cache_init("kivi4", group=8, residual=16)
    small = generate(params, CFG, prompts, 6, eos_ids=(), bucket=32, cache_init=init,
                     selection=Quest(budget=32, dense_layers=1))
    assert all(len(t) == 6 for t in small.tokens)
    assert small.stats["read_bytes_per_step"]["ratio"] < 0.6
    # the K/V stay in KIVI-4 form: well below a dense float32 cache of the same capacity
    dense = CFG.n_layers * B * HKV * small.stats["cache_capacity"] * 2 * D * params["embed"].dtype.itemsize
    assert small.stats["cache_bytes"] < 0.6 * dense, (small.stats, dense)
    kivi = jax.tree_util.tree_map(lambda x: x[0], init(CFG, 1, 64))
    with pytest.raises(TypeError, match="TokenSelect cannot select over a KIVICache: .*Quest and LouisKV"):
        wrap_layer(TokenSelect.from_budget(32), kivi, CFG)
    with pytest.raises(ValueError, match="source cache slots .* do not fit the KIVI layer"):
        wrap_layer(Quest(budget=32), kivi, CFG, _filled(96, [9, 9], [0, 0])[0])
