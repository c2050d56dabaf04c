"""KVTuner: the simulated mixed-precision cache equals the packed KIVI cache; the DP choice is optimal."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.quant import kivi, kvtuner
from models.config import ModelConfig
from models.llama import forward, init_params

TINY = ModelConfig(name="tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_dim=48)


@pytest.mark.parametrize("bits", [(4, 2)])
def test_simulated_cache_matches_packed_kivi(bits):
    params = init_params(TINY, jax.random.PRNGKey(0), scale=0.3, stacked=True)
    toks = jax.random.randint(jax.random.PRNGKey(1), (1, 29), 0, 64)
    tuner = kvtuner.KVTunerConfig((bits, bits), group=8, residual=16)
    sim = kvtuner.init_sim_cache(TINY, 1, 40, tuner)
    packed = kivi.init_kivi_cache(TINY, 1, 40, group=8, residual=16, k_bits=bits[0], v_bits=bits[1])
    outs = []
    for cache in (sim, packed):
        l1, cache, _ = forward(params, toks[:, :21], jnp.arange(21)[None], cache, TINY)
        l2, cache, _ = forward(params, toks[:, 21:], jnp.arange(21, 29)[None], cache, TINY)
        outs.append(np.concatenate([np.asarray(l1), np.asarray(l2)], 1))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_choose_is_optimal_by_brute_force():
    rng = np.random.default_rng(0)
    cands = kvtuner.CANDIDATES
    sens = rng.uniform(0, 1, (4, len(cands)))
    sens[:, 0] = 0.0                                     # KV8 is the reference
    cost = np.array([kb + vb for kb, vb in cands]) / 2
    for target in (2.5, 3.0, 4.0, 6.0):
        pick = kvtuner.choose(sens, target, cands)
        assert cost[pick].mean() <= target + 1e-9
        best = min(sum(sens[l, c] for l, c in enumerate(p)) for p in itertools.product(range(len(cands)), repeat=4)
                   if cost[list(p)].mean() <= target + 1e-9)
        assert sum(sens[l, c] for l, c in enumerate(pick)) == pytest.approx(best)
    with pytest.raises(ValueError, match="below the smallest"):
        kvtuner.choose(sens, 1.5, cands)


def test_config_accounting_and_bad_input():
    t = kvtuner.KVTunerConfig(((8, 8), (4, 2)))
    assert t.average_bits == pytest.approx((8 + 3) / 2)
    assert t.bytes_per_token(128) == pytest.approx((kivi.bytes_per_token(128, 8, 8, 32)
                                                    + kivi.bytes_per_token(128, 4, 2, 32)) / 2)
    with pytest.raises(ValueError, match="not supported"):
        kvtuner.KVTunerConfig(((3, 2),))
    with pytest.raises(ValueError, match="layers"):
        kvtuner.init_sim_cache(TINY, 1, 16, kvtuner.KVTunerConfig(((4, 4),)))


def test_search_on_tiny_model_meets_target():
    params = init_params(TINY, jax.random.PRNGKey(3), scale=0.3, stacked=True)
    toks = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (48,), 0, 64))
    tuner, sens = kvtuner.search(params, TINY, toks, 3.0, group=8, residual=16)
    assert tuner.average_bits <= 3.0 and len(tuner.layer_bits) == 2
    assert sens.shape == (2, len(kvtuner.CANDIDATES)) and np.all(sens[:, 1:] >= -1e-6)
    # lower precision costs more KL on average (a sanity check of the measured sensitivities)
    assert sens[:, -1].mean() > sens[:, 2].mean()
