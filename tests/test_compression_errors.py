"""Bad compression requests fail with clear messages; a budget covering the context is a no-op."""
import jax
import pytest

from kvjax.compression import Compression
from kvjax.generate import generate
from kvjax.policies import Budget, make_policy
from models.config import ModelConfig
from models.llama import init_params

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                  head_dim=8, ffn_dim=64, rope_theta=10000.0)
PARAMS = init_params(CFG, jax.random.PRNGKey(0), scale=0.25, stacked=True)
PROMPT = list(range(3, 43))  # 40 tokens


def test_budget_covering_context_is_noop_with_note():
    out = generate(PARAMS, CFG, [PROMPT], 3, compression=Compression(make_policy("knorm"), Budget(tokens=100)))
    full = generate(PARAMS, CFG, [PROMPT], 3)
    assert out.tokens == full.tokens
    assert "no compression" in out.stats["notes"][0]


def test_window_longer_than_context_shrinks_with_note():
    """SnapKV's 64-query window on a 40-token prompt at 50 % (20 tokens per head): the window
    shrinks to 10 (half the budget) with a note instead of an error (issue 19, item 4)."""
    out = generate(PARAMS, CFG, [PROMPT], 3, compression=Compression(make_policy("snapkv"), Budget(ratio=0.5)))
    assert any("window (64 queries) is not smaller than the budget (20 tokens" in n and "shrinks to 10" in n
               for n in out.stats["notes"])
    assert len(out.tokens[0]) == 3
    with pytest.raises(ValueError, match="chunk size 16 is smaller"):
        generate(PARAMS, CFG, [PROMPT], 3, chunk_size=16,
                 compression=Compression(make_policy("snapkv", window=32), Budget(tokens=36), when="chunk"))


@pytest.mark.parametrize("bad", ["0", "-0.5", "-3"])
def test_non_positive_budget(bad):
    with pytest.raises(ValueError, match="positive"):
        Budget.parse(bad)


def test_unknown_policy_and_schedule():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="when must be one of"):
        Compression(make_policy("knorm"), Budget(ratio=0.5), when="sometimes")
