"""Equal-byte budgets of kvjax.eval.frontier: byte counts against a hand count of each layout
(bf16 fp parts), the token budget is the largest that fits, and clear errors for bad input."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from kvjax.eval.frontier import (context_bytes, full_bytes, parse_family, parse_fractions,
                                 tokens_for_bytes)
from kvjax.generate import init_engine_cache
from kvjax.cache import tree_bytes
from models.config import ModelConfig

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                  ffn_dim=64, rope_theta=10000.0)
G, R, T = 8, 16, 300


def dense_bytes(keep, layers=CFG.n_layers):
    """bf16 K and V + int32 position per slot, int32 length per head."""
    return layers * CFG.n_kv_heads * (keep * (2 * CFG.head_dim * 2 + 4) + 4)


def kivi_evicted_bytes(keep, bits, layers=CFG.n_layers):
    """KIVI codes, fp16 scale+min (keys per channel per G tokens, values per G channels per token),
    bf16 K tail + V window of R tokens, 4 int32 counters, an int32 position per slot."""
    cq, d = -(-keep // G) * G, CFG.head_dim
    per_head = 2 * cq * d * bits // 8 + 2 * 2 * (cq // G) * d + 2 * 2 * cq * (d // G) + 2 * R * d * 2 + 4 * 4 + cq * 4
    return layers * CFG.n_kv_heads * per_head


@pytest.mark.parametrize("spec,count", [("snapkv", dense_bytes),
                                        (f"snapkv+kivi4:group={G}:residual={R}", lambda k: kivi_evicted_bytes(k, 4)),
                                        (f"h2o+kivi2:group={G}:residual={R}", lambda k: kivi_evicted_bytes(k, 2)),
                                        # demotion: + the evicted T - k tokens in KIVI-2 (a sawtooth in k)
                                        (f"snapkv~kivi2:group={G}:residual={R}",
                                         lambda k: dense_bytes(k) + kivi_evicted_bytes(T - k, 2)),
                                        # partial demotion: at most 0.2 * T = 60 of them
                                        (f"snapkv~kivi2:group={G}:residual={R}:budget=0.2",
                                         lambda k: dense_bytes(k) + kivi_evicted_bytes(min(T - k, 60), 2))])
def test_bytes_and_largest_token_budget(spec, count):
    fam = parse_family(spec, config=CFG)
    assert full_bytes(CFG, T) == dense_bytes(T)
    for keep in (1, 37, 120):
        assert context_bytes(CFG, fam, keep, T) == count(keep)
    for frac in ((0.7, 0.6) if "~" in spec else (0.25, 0.1)):   # KIVI-2 of every token alone: ~45% here
        target = frac * dense_bytes(T)
        keep = tokens_for_bytes(CFG, fam, target, T)
        assert count(keep) <= target and all(count(k) > target for k in range(keep + 1, T))
    assert tokens_for_bytes(CFG, fam, 0.5 * count(1), T) is None          # not one token fits


WINDOW = 40
GEMMA_LIKE = dataclasses.replace(CFG, n_layers=5, local_layers=(0, 1, 3, 4), sliding_window=WINDOW)


def ring_bytes_by_hand(context, n_local=4):
    """Each local layer: a ring of min(window, context) slots (bf16 K and V + int32 position per
    slot) and one int32 offset per batch row, whatever the family."""
    return n_local * (CFG.n_kv_heads * min(WINDOW, context) * (2 * CFG.head_dim * 2 + 4) + 4)


@pytest.mark.parametrize("context", [T, WINDOW // 2])
def test_bytes_with_sliding_window_layers(context):
    """Gemma-shaped (4 local layers, 1 global): a family replaces the global layer's cache only; the
    rings of the local layers count in both the family's bytes and the full cache's."""
    full = full_bytes(GEMMA_LIKE, context)
    assert full == dense_bytes(context, layers=1) + ring_bytes_by_hand(context)
    engine = jax.eval_shape(lambda: init_engine_cache(GEMMA_LIKE, 1, context, jnp.bfloat16))
    assert full == tree_bytes(engine)                     # what the engine allocates for the context
    snap = parse_family("snapkv", config=GEMMA_LIKE)
    combo = parse_family(f"snapkv+kivi4:group={G}:residual={R}", config=GEMMA_LIKE)
    for keep in (1, 7, context - 1):
        assert context_bytes(GEMMA_LIKE, snap, keep, context) == dense_bytes(keep, layers=1) + ring_bytes_by_hand(context)
        assert context_bytes(GEMMA_LIKE, combo, keep, context) == (kivi_evicted_bytes(keep, 4, layers=1)
                                                                     + ring_bytes_by_hand(context))
    count = lambda k: dense_bytes(k, layers=1) + ring_bytes_by_hand(context)
    target = ring_bytes_by_hand(context) + 0.5 * dense_bytes(context, layers=1)   # half the global layer's
    keep = tokens_for_bytes(GEMMA_LIKE, snap, target, context)
    assert count(keep) <= target and count(keep + 1) > target
    assert tokens_for_bytes(GEMMA_LIKE, snap, ring_bytes_by_hand(context), context) is None   # rings fill it


def test_quantized_cache_alone_is_one_point():
    fam = parse_family(f"kivi2:group={G}:residual={R}", config=CFG)
    own = context_bytes(CFG, fam, T, T)
    assert own < 0.5 * full_bytes(CFG, T)
    assert tokens_for_bytes(CFG, fam, own, T) == T and tokens_for_bytes(CFG, fam, own - 1, T) is None


@pytest.mark.parametrize("spec,match", [
    ("think+kivi4", "ThinK builds its own cache layout"),
    ("snapkv+gear4", "eviction x gear4 is not supported"),
    ("snapkv+kivi4:group=8:residual=16:sink=1", "sink tokens is not supported"),
    (f"snapkv+kivi4:bits=3:group={G}:residual={R}", "KIVI k_bits=3 is not supported"),
    ("kivi4:group=5", "group size 5 must be positive and divide head_dim=16"),
    ("snapkv+nope", "unknown quantized cache 'nope'"),
    (f"kivi4:group={G}:residual={R}~kivi2", "demotion stores the evicted tokens of a policy"),
    ("cam~kivi2", "merges the evicted tokens"),
    ("snapkv~gear2", "eviction x gear2 is not supported"),
    ("nope", "unknown policy 'nope'"),
])
def test_bad_families_name_the_reason(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_family(spec, config=CFG)


@pytest.mark.parametrize("spec,match", [("0", "not in"), ("1.5", "not in"), ("x", "bad byte fraction"),
                                        (",", "no byte fractions")])
def test_bad_fractions(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_fractions(spec)
    assert parse_fractions("0.25, 0.1,0.05") == (0.25, 0.1, 0.05)
