"""Options that used to be silently wrong or silently ignored (issue 19, items 4, 6 and 7).

Each test fails on the code before the fix: SnapKV's window vs a small budget (a float64
reference of the defined rule), decode-time compression with a token budget the prompt fits in,
`when="chunk"` without a chunk size, the empty answer, chunked prefill by default on long prompts,
the one budget syntax in every entry point.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.compression import Compression, fit_window
from kvjax.generate import generate, plan_cache
from kvjax.policies import Budget, make_policy
from kvjax.policies.base import Observation, select
from models.config import ModelConfig
from models.llama import init_params

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                  head_dim=8, ffn_dim=64, rope_theta=10000.0)
PROMPT = list(range(3, 43))  # 40 tokens


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0), scale=0.25, stacked=True)


# ---------------------------------------------------------------------------------------------
# SnapKV with a budget not larger than its observation window

def _probs(s: int, w: int, hq: int, seed: int = 0) -> np.ndarray:
    """float32 causal softmax rows [1, 1, Hq, w, S] of the last w queries of an s-token context."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (1, 1, hq, 1, s)) + rng.normal(0.0, 1.0, (1, 1, hq, w, s))
    q_pos = np.arange(s - w, s)[:, None]
    logits = np.where(np.arange(s)[None, :] <= q_pos, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _reference_kept(probs: np.ndarray, n_keep: int, kv_heads: int) -> list[set]:
    """float64 reference of the rule for n_keep <= window: window w = max(1, n_keep // 2) newest
    queries observe, the w newest tokens are kept, plus the n_keep - w best older tokens by the
    window attention summed over queries, averaged over the GQA group, avg-pooled (kernel 5, zero
    padding counted) with the window's own columns zeroed first. -> kept slots per kv head."""
    w = max(1, n_keep // 2)
    p = probs[0, 0].astype(np.float64)[:, -w:, :].sum(1)                 # [Hq, S]
    s = p.shape[-1]
    x = p.reshape(kv_heads, -1, s).mean(1)                               # [Hkv, S]
    x[:, s - w:] = 0.0
    xp = np.pad(x, [(0, 0), (2, 2)])
    pooled = sum(xp[:, k:k + s] for k in range(5)) / 5
    kept = []
    for h in range(kv_heads):
        older = np.argsort(-pooled[h, : s - w], kind="stable")[: n_keep - w]
        kept.append(set(older.tolist()) | set(range(s - w, s)))
    return kept


@pytest.mark.parametrize("n_keep", [10, 64, 3])
def test_budget_not_above_the_window_shrinks_it_float64(n_keep):
    """SnapKV (window 64) at n_keep <= 64 tokens per head: the window becomes n_keep // 2 with a note,
    and the kept set matches a float64 reference of that rule. Before: with a context longer than
    the window, the 64 protected window slots tied at +inf and the oldest n_keep of them were kept
    (the newest tokens and every scored token dropped: the 5 % cliff of issue 19)."""
    s, kv, hq = 200, 2, 6
    comp, note = fit_window(Compression(make_policy("snapkv"), Budget(tokens=n_keep)), n_keep)
    assert comp.policy.window == max(1, n_keep // 2)
    assert note and f"shrinks to {max(1, n_keep // 2)}" in note
    plan = plan_cache(s, [s], 4, None, Compression(make_policy("snapkv"), Budget(tokens=n_keep)))
    assert plan.compression.policy.window == comp.policy.window and plan.notes == (note,)
    probs = _probs(s, 64, hq)
    cache = kvcache.init_cache(1, 1, kv, s, 8)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), cache.positions.shape)
    cache = dataclasses.replace(cache, positions=positions, lengths=jnp.full(cache.lengths.shape, s, jnp.int32))
    obs = Observation(cache=cache, config=None, window_probs=jnp.asarray(probs[..., -comp.policy.window:, :]))
    scores = comp.policy.score(obs)
    idx = np.asarray(select(scores, cache.positions >= 0, jnp.full((1, 1, kv), n_keep), n_keep))
    ours = [set(idx[0, 0, h].tolist()) for h in range(kv)]
    assert ours == _reference_kept(probs, n_keep, kv)
    assert all(s - 1 in k for k in ours)   # the newest token is kept


def test_pyramidkv_and_think_windows_shrink_too():
    for name, fields in (("pyramidkv", ("window",)), ("think", ("query_window",))):
        comp, note = fit_window(Compression(make_policy(name), Budget(tokens=20)), 20)
        assert note is not None
        pol = comp.policy
        for f in fields:
            assert getattr(pol, f) == 10
        if name == "think":
            assert pol.token_policy.window == 10
    comp, note = fit_window(Compression(make_policy("snapkv"), Budget(tokens=65)), 65)
    assert note is None and comp.policy.window == 64          # window < budget: unchanged


def test_short_prompt_snapkv_generates_with_a_note(params):
    """SnapKV's 64-query window on a 40-token prompt at 25 % (the README's chat example)."""
    out = generate(params, CFG, [PROMPT], 4, compression=Compression(make_policy("snapkv"), Budget(ratio=0.25)))
    assert len(out.tokens[0]) == 4
    assert any("shrinks to 5" in n for n in out.stats["notes"])
    assert out.stats["cache_capacity"] == 10 + 4


# ---------------------------------------------------------------------------------------------
# decode-time compression, chunk schedule, empty answers, default chunked prefill

def test_decode_budget_acts_when_the_prompt_fits(params):
    """H2O, 48-token budget, decode schedule, 40-token prompt + 30 new tokens: the live cache grows
    past 48, so the loop compresses (before: "keeps the whole context", never compressed). Tokens
    equal the full cache's until the first compression (after 56 = 48 + interval 8 slots fill)."""
    comp = Compression(make_policy("h2o"), Budget(tokens=48), when="decode", interval=8)
    full = generate(params, CFG, [PROMPT], 30)
    out = generate(params, CFG, [PROMPT], 30, compression=comp)
    assert not any("no compression" in n for n in out.stats["notes"])
    assert any("compressed during decode" in n for n in out.stats["notes"])
    assert out.stats["cache_capacity"] == 48 + 8 < full.stats["cache_capacity"]
    assert int(jnp.max(out.cache.lengths)) <= 56
    assert out.tokens[0][:16] == full.tokens[0][:16]
    # a token budget covering prompt + new tokens is still a no-op with a note
    big = generate(params, CFG, [PROMPT], 30, compression=dataclasses.replace(comp, budget=Budget(tokens=70)))
    assert big.tokens == full.tokens and "prompt + new tokens" in big.stats["notes"][0]


def test_when_chunk_without_chunk_size_says_what_it_does(params):
    comp = Compression(make_policy("knorm"), Budget(tokens=20), when="chunk")
    out = generate(params, CFG, [PROMPT], 3, compression=comp)
    assert out.stats["prefill_chunk"] == 512
    assert any("without a chunk size: chunks of 512" in n for n in out.stats["notes"])


def test_empty_answer_is_reported(params):
    first = generate(params, CFG, [PROMPT], 2).tokens[0][0]
    out = generate(params, CFG, [PROMPT], 3, eos_ids=(first,))
    assert out.tokens == [[first]]
    assert any("empty answer" in n for n in out.stats["notes"])


def test_long_prompt_prefills_in_chunks_by_default(params):
    """A 1,100-token prompt (padded 1,152) on CPU: 3 chunks of 384 (<= the 512 default) instead of one
    1,152 x 1,152 attention; the same greedy tokens as one forward."""
    long = np.random.default_rng(0).integers(3, 97, 1100).tolist()
    auto = generate(params, CFG, [long], 6)
    one = generate(params, CFG, [long], 6, chunk_size=2048)
    assert auto.stats["prefill_chunk"] == 384 and one.stats["prefill_chunk"] == 2048
    assert auto.tokens == one.tokens


# ---------------------------------------------------------------------------------------------
# one budget syntax in every entry point

@pytest.mark.parametrize("text", ["1.5", "abc", "0"])
def test_bad_budgets_rejected_everywhere(text):
    """`Budget.parse` (eval grid, Locret) reads budgets as `parse_budget` does: '1.5' used to be 1 token."""
    from kvjax.eval.harness import parse_budgets
    with pytest.raises(ValueError, match="0.25 or 25%"):
        Budget.parse(text)
    with pytest.raises(ValueError, match="0.25 or 25%"):
        parse_budgets(f"0.5,{text}")
    assert parse_budgets("25%,512tok,1") == (Budget(ratio=0.25), Budget(tokens=512), Budget(ratio=1.0))
