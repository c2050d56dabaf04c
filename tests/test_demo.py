"""kvjax.demo: the full / compressed side-by-side the demo prints (issue 19, item 3), on a tiny model."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression
from kvjax.demo import answer_tokens, compare_caches, format_compared
from kvjax.policies import Budget, make_policy
from models.config import ModelConfig
from kvjax.generate import forward_jit as forward
from models.llama import init_params
from kvjax.cache import init_cache

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2,
                  head_dim=8, ffn_dim=64, rope_theta=10000.0)


@dataclasses.dataclass(frozen=True)
class DigitTokenizer:
    """Ids as text; no stop ids, so the random model always answers max_new_tokens tokens."""
    stop_ids: tuple = ()
    pad_id: int = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.fixture(scope="module")
def rows():
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.25, stacked=True)
    prompt = [int(x) for x in np.random.default_rng(3).integers(1, CFG.vocab_size, 40)]
    methods = {"full": None, "streaming 25%": Compression(make_policy("streaming_llm"), Budget(ratio=0.25))}
    tok = DigitTokenizer()
    rows = compare_caches(params, CFG, tok, prompt, methods, max_new_tokens=6, expected=None)
    return params, prompt, rows


def _kl(p_logits, q_logits):
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_full_row_has_zero_kl_and_compressed_row_less_memory(rows):
    _, _, (full, stream) = rows
    assert full.kl == 0.0 and full.kl_max == 0.0
    assert stream.cache_bytes < full.cache_bytes / 2                   # 10 of 40 prompt slots + the answer
    assert "of full" in format_compared(stream, full.cache_bytes)


def test_streaming_kl_matches_a_float64_masked_forward(rows):
    """StreamingLLM at 25% of 40 tokens keeps the 4 sink tokens and the last 6 (its spec); the KL over
    the full answer equals the KL of a plain forward over [prompt + answer] against a plain forward
    in which the answer tokens see only those kept prompt tokens (float64 KL computed here)."""
    params, prompt, (full, stream) = rows
    answer = [int(t) for t in full.answer.split()]
    assert len(answer) == 6 and stream.kl > 1e-4
    seq = np.asarray(prompt + answer, np.int32)[None]
    n, t = len(prompt), seq.shape[1]
    pos = np.arange(t, dtype=np.int32)[None]
    ref, _, _ = forward(params, seq, pos, init_cache(CFG.n_layers, 1, CFG.n_kv_heads, t, CFG.head_dim), CFG,
                        all_logits=True)
    # compressed: prefill the kept prompt tokens (sinks + recent, at their original positions) and the answer
    policy = make_policy("streaming_llm")
    keep = sorted(set(range(policy.n_sink)) | set(range(n - (10 - policy.n_sink), n)))
    prefix = np.asarray(prompt, np.int32)[None]
    _, cache, _ = forward(params, prefix, pos[:, :n], init_cache(CFG.n_layers, 1, CFG.n_kv_heads, t, CFG.head_dim),
                          CFG, all_logits=True)
    mask = np.full(t, -1, np.int32)
    mask[keep] = keep
    cache = dataclasses.replace(cache, positions=jnp.broadcast_to(jnp.asarray(mask), cache.positions.shape),
                                lengths=jnp.full(cache.lengths.shape, n, jnp.int32))
    # answer[0] comes from the prefill's last logits (full attention: KL 0); answer[i], i >= 1, from
    # answer[i - 1] fed at position n + i - 1 over the kept slots
    comp, _, _ = forward(params, seq[:, n:-1], pos[:, n:-1], cache, CFG, all_logits=True)
    kl = np.concatenate([[0.0], _kl(ref[0, n:-1], comp[0])])
    np.testing.assert_allclose(stream.kl, kl.mean(), rtol=1e-3)


def test_answer_tokens_and_errors(rows):
    params, prompt, _ = rows
    assert answer_tokens(DigitTokenizer(stop_ids=(2,)), [5, 7, 2]) == [5, 7]
    with pytest.raises(ValueError, match="full cache"):
        compare_caches(params, CFG, DigitTokenizer(), prompt, {"s": Compression(make_policy("h2o"), Budget(ratio=0.5))})
