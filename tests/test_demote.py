"""Demotion instead of eviction (kvjax.quant.demote): a policy's evicted tokens kept at low precision.

References: the plain policy's kept set (same engine, dense cache), the full cache's K/V, the float64
KIVI rule of `test_evict_quant._ref_store` on the evicted tokens, float64 softmax attention, and
hand counts of the layouts' bytes."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression
from kvjax.eval import fidelity
from kvjax.observation import Observe
from kvjax.policies import make_policy
from kvjax.policies.base import Budget
from test_evict_quant import CFG, G, KIVI4, R, _ref_store, _softmax_attend, context, params  # noqa: F401
from test_quant_kivi import assert_matches_ref

DEMOTE = f"kivi2:group={G}:residual={R}"


def _comp(policy: str, demote=None, ratio=0.3):
    kw = dict(ragged=False) if policy == "adakv" else {}
    return Compression(make_policy(policy, config=CFG, **kw), Budget(ratio=ratio), demote=demote)


def _live(pos):
    return sorted(int(p) for p in pos[pos >= 0])


def _full_kv(full, i, b, h):
    """(positions, keys, values) in position order of the full (uncompressed) cache's live tokens,
    layer i, head h of row b (float64 numpy)."""
    pos, keys, values = (x[i][b, h] for x in full)
    order = np.argsort(np.where(pos >= 0, pos, 1 << 30))[:int((pos >= 0).sum())]
    return pos[order], keys[order], values[order]


@pytest.fixture(scope="module")
def full(params, context):
    """The full cache's (positions, keys, values) per layer as numpy (float64 K/V)."""
    cache = fidelity.prefill_context(params, CFG, context, None, 4).cache
    return tuple([np.asarray(getattr(lc, f), np.float64 if f != "positions" else np.int32) for lc in cache.layers]
                 for f in ("positions", "keys", "values"))


@pytest.mark.parametrize("policy", ["snapkv", "adakv"])
def test_high_precision_set_is_the_policy_kept_set(params, context, full, policy):
    """Kept positions = the plain policy's; demoted positions = every other live token; the demoted
    K/V dequantize to the float64 KIVI rule on the full cache's K/V of those tokens; prefill logits
    unchanged (scores and selection are the plain policy's)."""
    plain = fidelity.prefill_context(params, CFG, context, _comp(policy), 4)
    dem = fidelity.prefill_context(params, CFG, context, _comp(policy, DEMOTE), 4)
    np.testing.assert_array_equal(np.asarray(dem.logits), np.asarray(plain.logits))
    for i, layer in enumerate(dem.cache.layers):
        assert type(layer).__name__ == "DemotedLayer"
        kp, dp = np.asarray(layer.positions), np.asarray(layer.demoted_positions)
        pp = np.asarray(plain.cache.layers[i].positions)
        back = layer.demoted.to_dense()
        bk, bv, dlen = np.asarray(back.keys, np.float64), np.asarray(back.values, np.float64), np.asarray(
            layer.demoted.lengths)
        for b in range(context.shape[0]):
            for h in range(CFG.n_kv_heads):
                assert _live(kp[b, h]) == _live(pp[b, h])
                pos, k, v = _full_kv(full, i, b, h)
                ev = sorted(set(pos.tolist()) - set(_live(pp[b, h])))
                assert _live(dp[b, h]) == ev and len(ev) > 0
                sel = np.isin(pos, ev)
                n = len(ev)
                assert dlen[b, h] == n
                kh, vh, kl, vl = _ref_store(k[sel], v[sel], n, 2)
                gk, gv = bk[b, h, :n], bv[b, h, :n]
                assert_matches_ref(gk[:kl], k[sel][:kl], 2, G, axis=0)
                assert_matches_ref(gv[:vl], v[sel][:vl], 2, G, axis=1)
                tol = 1e-5 * (np.abs(k).max() + np.abs(v).max())     # prefill paths differ by fp32 rounding
                np.testing.assert_allclose(gk[kl:], k[sel][kl:], rtol=0, atol=tol)        # fp key tail
                np.testing.assert_allclose(gv[vl:], v[sel][vl:], rtol=0, atol=tol)        # fp value window


def _decode_step_vs_float64(cache, full, t, tiers):
    """A decode step on every layer of a demoted `cache` (append one token to the kept region, attend one
    query per q head) equals float64 softmax attention over: the kept tokens exact (the full cache's K/V),
    the demoted ones as the float64 KIVI rule dequantizes them, and the new token. tiers(i, b, h, pos, k,
    kept_pos, demoted_pos) -> (kept, demoted) boolean masks over the full cache's live tokens `pos`
    (position order; it may check them)."""
    rng = np.random.default_rng(5)
    b_ = full[0][0].shape[0]
    hq, hkv, d = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
    for i, layer in enumerate(cache.layers):
        kn, vn = rng.normal(size=(2, b_, hkv, 1, d)).astype(np.float32)
        q = rng.normal(size=(b_, hq, 1, d)).astype(np.float32)
        qpos = jnp.full((b_, 1), t, jnp.int32)
        kp, dp = np.asarray(layer.positions), np.asarray(layer.demoted_positions)
        layer = layer.append(jnp.asarray(kn), jnp.asarray(vn), qpos)
        out, _ = layer.attend(jnp.asarray(q), qpos, observe=Observe(), backend="xla")
        out = np.asarray(out, np.float64)
        for b in range(b_):
            for h in range(hkv):
                pos, k, v = _full_kv(full, i, b, h)
                kept, dem = tiers(i, b, h, pos, k, kp[b, h], dp[b, h])
                kh, vh, _, _ = _ref_store(k[dem], v[dem], int(dem.sum()), 2)
                keys, vals = np.vstack([k[kept], kh, kn[b, h]]), np.vstack([v[kept], vh, vn[b, h]])
                for g in range(hq // hkv):
                    ref = _softmax_attend(q[b, h * (hq // hkv) + g, 0].astype(np.float64), keys, vals)
                    got = out[b, h * (hq // hkv) + g, 0]
                    assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref), (i, b, h, g)


def test_attention_over_both_regions_vs_float64(params, context, full):
    """Every evicted token demoted: `_decode_step_vs_float64` with demoted = every live token not kept."""
    dem = fidelity.prefill_context(params, CFG, context, _comp("snapkv", DEMOTE), 4)

    def tiers(i, b, h, pos, k, kept_pos, demoted_pos):
        kept = np.isin(pos, _live(kept_pos))
        return kept, ~kept
    _decode_step_vs_float64(dem.cache, full, context.shape[1], tiers)


def _assert_ranked(score, tiers, counts, tol):
    """float64 reference of a ranking: `tiers` (boolean masks over one head's tokens, best tier first,
    the rest dropped) hold exactly `counts` tokens and every token of a tier scores at least every
    token of the later tiers (up to `tol`: tokens of one id have equal |k| in exact arithmetic)."""
    rest = ~np.any(tiers, axis=0)
    for j, (tier, n) in enumerate(zip(tiers, counts)):
        assert tier.sum() == n
        later = np.any(list(tiers[j + 1:]) + [rest], axis=0)
        assert score[tier].min() >= score[later].max() - tol


def test_partial_demotion_next_best_bytes_attention(params, context, full):
    """`budget=0.2`: KNorm keeps its best 30% and demotes the next-best floor(0.2 x 90) (float64 ranking
    of -||k|| on the full cache's keys), no other token; the demoted region is allocated at that budget rounded to G
    (memory_bytes = hand count), and a decode step on every layer equals float64 attention over the
    kept tokens exact, the demoted ones by the float64 KIVI rule and the new token."""
    b_, t = context.shape
    hkv, d, L = CFG.n_kv_heads, CFG.head_dim, CFG.n_layers
    keep, n_dem = Budget(ratio=0.3).kept(t), int(0.2 * t)
    assert n_dem < t - keep       # some evicted tokens are dropped
    comp = Compression(make_policy("knorm"), Budget(ratio=0.3), demote=f"{DEMOTE}:budget=0.2")
    dem = fidelity.prefill_context(params, CFG, context, comp, 4)
    cd = -(-n_dem // G) * G
    assert dem.cache.layers[0].demoted.capacity == cd
    dense_head = dem.cache.capacity * (2 * d * 4 + 4) + 4
    assert dem.cache.memory_bytes() == L * b_ * hkv * (dense_head + _evicted_kivi_bytes(cd, 2))

    def tiers(i, b, h, pos, k, kept_pos, demoted_pos):
        kept, dem = np.isin(pos, _live(kept_pos)), np.isin(pos, _live(demoted_pos))
        norm = np.linalg.norm(k, axis=-1)
        _assert_ranked(-norm, [kept, dem], [keep, n_dem], 1e-6 * norm.max())
        return kept, dem
    _decode_step_vs_float64(dem.cache, full, t, tiers)


def _evicted_kivi_bytes(cq, bits, fp_bytes=4):
    """One head of an EvictedKIVICache: codes, fp16 K stats per channel per G tokens and V stats per G
    channels per token, fp K tail + V window of R tokens, 4 int32 counters, an int32 position per slot."""
    d = CFG.head_dim
    return 2 * cq * d * bits // 8 + 2 * 2 * (cq // G) * d + 2 * 2 * cq * (d // G) + 2 * R * d * fp_bytes + 16 + cq * 4


def test_memory_bytes_held_and_between_evict_and_full(params, context):
    """memory_bytes = hand count of both regions (allocated at their capacities: kept at budget + room,
    demoted at context - budget rounded to G); evict-only < demoted < full, with kept bf16/f32 or KIVI-4."""
    b, t = context.shape
    hkv, d, L = CFG.n_kv_heads, CFG.head_dim, CFG.n_layers
    full_bytes = L * b * hkv * (t * (2 * d * 4 + 4) + 4)      # dense f32 cache of the context alone
    plain = fidelity.prefill_context(params, CFG, context, _comp("snapkv"), 4)
    dem = fidelity.prefill_context(params, CFG, context, _comp("snapkv", DEMOTE), 4)
    keep = Budget(ratio=0.3).kept(t)
    cd = -(-(t - keep) // G) * G
    c = dem.cache.capacity
    assert c == keep + 4 and dem.cache.layers[0].demoted.capacity == cd
    dense_head = c * (2 * d * 4 + 4) + 4
    assert dem.cache.memory_bytes() == L * b * hkv * (dense_head + _evicted_kivi_bytes(cd, 2))
    assert plain.cache.memory_bytes() < dem.cache.memory_bytes() < full_bytes
    plain4 = fidelity.prefill_context(params, CFG, context, _comp("snapkv"), 4, kv_quant=KIVI4)
    dem4 = fidelity.prefill_context(params, CFG, context, _comp("snapkv", DEMOTE), 4, kv_quant=KIVI4)
    ck = -(-c // G) * G
    assert dem4.cache.memory_bytes() == L * b * hkv * (_evicted_kivi_bytes(ck, 4) + _evicted_kivi_bytes(cd, 2))
    assert plain4.cache.memory_bytes() < dem4.cache.memory_bytes() < dem.cache.memory_bytes()
    for i, layer in enumerate(dem4.cache.layers):    # KIVI-4 kept region: still the policy's kept set
        assert type(layer.kept).__name__ == "EvictedKIVICache"
        got, want = np.asarray(layer.positions), np.asarray(dem.cache.layers[i].positions)
        assert all(_live(got[bb, h]) == _live(want[bb, h]) for bb in range(b) for h in range(hkv))


def test_generate_and_refusals(params):
    """generate with demotion (kept tokens in KIVI-4) decodes; refused combinations name why."""
    from kvjax.cli import build_parser, check_generate_args
    from kvjax.generate import generate
    prompts = [list(range(1, 71)), list(range(5, 60))]
    comp = Compression(make_policy("snapkv", window=8), Budget(ratio=0.3), demote=DEMOTE)
    out = generate(params, CFG, prompts, 6, compression=comp, bucket=1, cache_init=KIVI4)
    assert all(len(r) == 6 for r in out.tokens) and "evicted->" in out.stats["compression"]
    assert {type(lc.kept).__name__ for lc in out.cache.layers} == {"EvictedKIVICache"}
    for policy, kw, match in (("snapkv", dict(when="chunk"), "runs once after the prefill"),
                              ("streaming_llm", {}, "re-rotates the kept keys"),
                              ("cam", {}, "merges the evicted tokens"),
                              ("think", {}, "builds its own cache layout")):
        pol = make_policy(policy, rerotate=True) if policy == "streaming_llm" else make_policy(policy)
        with pytest.raises(ValueError, match=match):
            Compression(pol, Budget(ratio=0.3), demote="kivi2", **kw)
    with pytest.raises(ValueError, match="eviction x mikv is not supported"):
        Compression(make_policy("snapkv"), Budget(ratio=0.3), demote="mikv")
    for bad, match in (("kivi2:budget=abc", "not a number"), ("kivi2:budget=0.1:budget=0.2", "given twice")):
        with pytest.raises(ValueError, match=match):
            Compression(make_policy("snapkv"), Budget(ratio=0.3), demote=bad)
    with pytest.raises(ValueError, match="unknown quantized cache"):
        Compression(make_policy("snapkv"), Budget(ratio=0.3), demote="kivi3")
    cli = lambda *a: check_generate_args(build_parser().parse_args(["generate", "--prompt", "hi", *a]))
    with pytest.raises(ValueError, match="give --policy"):
        cli("--demote", "kivi2")
    with pytest.raises(ValueError, match="merges the evicted tokens"):
        cli("--policy", "cam", "--budget", "0.3", "--demote", "kivi2")
    cli("--policy", "snapkv", "--budget", "0.3", "--demote", "kivi2", "--kv-quant", "kivi4")   # accepted


def test_eval_grid_demote_rows(params):
    """`eval --policy snapkv --demote kivi2:budget=0.25`: a policy~demote row per budget (prefill) holding
    the policy row's cache plus its demoted region (hand count: the 16 tokens of the demote budget out
    of 48 evicted); KL finite; an unknown storage fails before anything runs."""
    from kvjax.cli import build_parser, eval_config_from_args
    from kvjax.eval.harness import EvalConfig, run_grid
    spec = f"{DEMOTE}:budget=0.25"
    args = build_parser().parse_args(["eval", "--policy", "snapkv:window=4", "--budget", "0.25", "--demote", spec,
                                      "--needle", "", "--decode-probe", "0"])
    rows = run_grid(params, CFG, None, "", eval_config_from_args(args), progress=False,
                    tokens=(list(range(1, 65)), list(range(30, 38))))
    assert [r["policy"] for r in rows] == ["full", "snapkv:window=4", f"snapkv:window=4~{spec}"]
    _, plain, part = rows
    assert not part["notes"].startswith("error") and np.isfinite(part["kl"]) and part["kl"] >= 0, part
    assert part["cache_bytes"] - plain["cache_bytes"] == CFG.n_layers * CFG.n_kv_heads * _evicted_kivi_bytes(16, 2)
    with pytest.raises(ValueError, match="unknown quantized cache"):
        EvalConfig(policies=("snapkv",), demote=("kivi3",))
