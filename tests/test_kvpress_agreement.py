"""Peer cross-check: kvjax policies keep the same KV entries as NVIDIA kvpress 0.5.5 on SmolLM2-135M.

The fixture `fixtures/kvpress_indices.npz` was recorded by `benchmarks/peers/kvpress_indices.py` in a
separate torch venv: kvpress's presses ran on the HF transformers model loaded from the same GGUF
(float32), prefilling three KJV prompts (384 / 448 / 512 tokens) at kvpress compression ratios 0.5 and
0.75 (fraction removed; n_kept = int(T * (1 - ratio))), and the kept token indices per (layer, kv-head)
were captured from the press itself (ThinK: kept key channels). Here our model runs the same tokens
once per prompt and our policies select through the shared `policies.base.compress` path.

The HF model's logits of a short prompt are in the fixture too (an independent check of our GGUF
loader -- dequantization, q/k un-permutation -- and forward), and the logits of 8 tokens fed after a
compressed prompt (kvpress's pipeline feeding a question), which checks the compressed cache end to end.

SnapKV zeroes the window's own columns before pooling, as kvpress and the SnapKV reference code do,
so its kept indices match up to float ties.

What counts as a float tie (issue 19): a swap -- a token kept by us but not by kvpress, or by kvpress but
not by us -- is a tie only if kvpress's score of it is within TIE_RTOL of kvpress's k-th (cut-off) score
RELATIVE TO THAT CUT-OFF SCORE (plus TIE_ATOL for zero scores). Every swap of every scored method, at
every ratio, must be a tie. The earlier rule (1e-5 x the head's LARGEST score) accepted a 1.2e-4 relative
gap at a cut-off of 5e-5 and so hid SnapKV's fp32-cumsum pooling error; that pooling fails this rule.
kvpress's scores do not depend on the compression ratio, so the fixture's ratio-0.5 scores also give
the cut-off at 0.75.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache
from kvjax.policies.base import Observation, ScoringPolicy, compress
from kvjax.policies.expected_attention import ExpectedAttention
from kvjax.policies.knorm import KNorm
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.streaming_llm import StreamingLLM
from kvjax.policies.think import ThinK
from kvjax.policies.tova import TOVA
from kvjax.observation import Observe, Observer
from models.llama import forward

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "kvpress_indices.npz"
MIN_AGREEMENT = 0.99
TIE_RTOL = 1e-5   # a swap is a float tie if |score - cut| <= TIE_RTOL * |cut| + TIE_ATOL (cut: k-th score)
TIE_ATOL = 1e-12  # only for zero (or denormal) cut-off scores
SCORED = ("snapkv", "knorm", "tova", "expected_attention")   # methods whose kvpress scores are in the fixture


@pytest.fixture(scope="module")
def peer():
    z = np.load(FIXTURE)
    settings = json.loads(bytes(z["settings_json"]).decode())
    return z, settings


def _policies():
    """Our policy for every kvpress press, with kvpress's defaults (asserted against the fixture below)."""
    pols = {"snapkv": SnapKV(window=64, kernel=5, pool="avg", reduce="mean"),
            "streaming_llm": StreamingLLM(n_sink=4),
            "knorm": KNorm(),
            "tova": TOVA()}
    return pols


def _union_observe(policies) -> Observe:
    """One forward serves every policy: the largest window and every flag any policy asks for."""
    specs = [p.observe for p in policies]
    return Observe(window=max(s.window for s in specs), column_sums=any(s.column_sums for s in specs),
                   qkv=any(s.qkv for s in specs), hidden=any(s.hidden for s in specs))


@dataclasses.dataclass(frozen=True)
class _EveryScore(ScoringPolicy):
    """Test-only scorer: one forward serves every tested policy. Inside each layer it computes the
    score of each of `policies` on that layer's observation (the union of their needs) and returns
    them side by side on the kv-head axis: policy i's scores are heads [i * Hkv, (i + 1) * Hkv)."""

    policies: tuple = ()

    @property
    def observe(self) -> Observe:
        return _union_observe(self.policies)

    def score(self, obs: Observation) -> jax.Array:
        return jnp.concatenate([p.score(obs).astype(jnp.float32) for p in self.policies], axis=2)


@dataclasses.dataclass(frozen=True)
class Observed:
    """One prompt after a full prefill: its cache, length, every policy's scores [L, 1, Hkv, T]
    (reduced inside the layers) and the last 32 post-RoPE queries [L, 1, Hq, 32, d] (ThinK)."""

    cache: kvcache.KVCache
    config: object
    t: int
    scores: dict
    queries: jax.Array


_forward = jax.jit(forward, static_argnames=("config", "observe", "all_logits", "observer", "attention"))


@pytest.fixture(scope="module")
def observed(smollm2, peer):
    """Per prompt: an `Observed` after a full prefill, every tested policy's scores from one forward."""
    config, params = smollm2
    z, settings = peer
    named = {**_policies(), "expected_attention": ExpectedAttention(), "think": ThinK(query_window=32)}
    union = _EveryScore(tuple(named.values()))
    hkv = config.n_kv_heads
    out = []
    for p in range(len(settings["prompts"])):
        ids = jnp.asarray(z[f"tokens/{p}"])[None]
        t = ids.shape[1]
        cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
        _, cache, outs = _forward(params, ids, jnp.arange(t, dtype=jnp.int32)[None], cache, config,
                                  observer=Observer(union, queries=32))
        scores = {name: outs["scores"][:, :, i * hkv:(i + 1) * hkv] for i, name in enumerate(named)}
        out.append(Observed(cache, config, t, scores, outs["queries"]))
    return out


def _compress(policy, name: str, obs: Observed, n: int):
    """compress with the scores `name` reduced in the forward (ThinK: and its window queries)."""
    return compress(policy, obs.config, obs.cache, obs.scores[name], jnp.array([n], jnp.int32), capacity=n,
                    max_keep=n, queries=obs.queries)


def _kept(policy, name: str, obs: Observed, n: int) -> np.ndarray:
    """Our kept token indices [layers, kv_heads, n] through the shared compress path (scores reduced in
    the layers -> select -> gather at the budget); after a prefill from position 0 a slot's position
    is its token index."""
    new, _ = _compress(policy, name, obs, n)
    kept = np.asarray(new.positions[:, 0])
    assert (kept >= 0).all(), "a head kept fewer than n tokens"
    return np.sort(kept, axis=-1)


def _agreement(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|ours & ref| / n per (layer, head): [layers, kv_heads]."""
    n = ref.shape[-1]
    return np.array([[len(np.intersect1d(o, r)) / n for o, r in zip(ol, rl)] for ol, rl in zip(ours, ref)])


def _check_method(name, policy, peer, observed, ratios=None):
    """Agreement >= 99% for every (prompt, ratio); returns {(prompt, ratio): (agreement, ours, ref)}."""
    z, settings = peer
    results = {}
    for p, obs in enumerate(observed):
        t = obs.t
        for r in ratios or settings["ratios_removed"]:
            ref = z[f"kept/{name}/{r:g}/{p}"].astype(np.int64)
            n = ref.shape[-1]
            assert n == int(t * (1 - r)), "fixture n_kept is not kvpress's int(T * (1 - ratio))"
            ours = _kept(policy, name, obs, n)
            agree = _agreement(ours, ref)
            results[p, r] = (agree.mean(), ours, ref)
            assert agree.mean() >= MIN_AGREEMENT, (
                f"{name} prompt {p} ratio {r}: kept-index agreement {agree.mean():.4f} < {MIN_AGREEMENT}; "
                f"worst (layer, head) {np.unravel_index(agree.argmin(), agree.shape)} = {agree.min():.3f}")
    return results


def _is_tie(score: float, cut: float) -> bool:
    """A swapped token's score is a float tie with the cut-off score: within a RELATIVE tolerance of the
    cut-off itself (not of the head's largest score, which let real score gaps pass as ties)."""
    return score == cut or abs(score - cut) <= TIE_RTOL * abs(cut) + TIE_ATOL


def _unexplained(ours, ref, ref_scores, n):
    """(layer, head, token, kvpress score, cut-off) for every swap (token in exactly one of our and
    kvpress's kept sets) whose kvpress score is not a tie (`_is_tie`) with kvpress's n-th largest score."""
    bad = []
    ref_scores = np.asarray(ref_scores, np.float64)
    for l in range(ref.shape[0]):
        for h in range(ref.shape[1]):
            diff = np.setxor1d(ours[l, h], ref[l, h])
            if not diff.size:
                continue
            s = ref_scores[l, h]
            cut = np.sort(s)[::-1][n - 1]
            bad += [(l, h, int(j), float(s[j]), float(cut)) for j in diff if not _is_tie(s[j], cut)]
    return bad


def _assert_swaps_are_ties(name, results, z):
    """Every swap of `name` at every (prompt, ratio) in `results` is a float tie (kvpress's scores)."""
    for (p, r), (_, ours, ref) in results.items():
        bad = _unexplained(ours, ref, z[f"scores/{name}/{p}"], ref.shape[-1])
        assert not bad, (f"{name} prompt {p} ratio {r}: {len(bad)} non-tie swaps (layer, head, token, "
                         f"kvpress score, cut-off), e.g. {bad[:5]}")


def test_tie_rule_is_relative_to_the_cut_off():
    """The issue-19 case: 1.18016e-6 vs a cut-off of 1.18475e-6 (0.4% apart) is a real gap, although it
    is far below 1e-5 x a head's largest score (~1), which the old rule accepted."""
    assert not _is_tie(1.18016e-6, 1.18475e-6)
    assert _is_tie(1.18016e-6 * (1 + 5e-6), 1.18016e-6)
    assert _is_tie(0.0, 0.0) and _is_tie(1e-13, 0.0) and not _is_tie(1e-9, 0.0)


def test_every_scored_method_is_tie_checked(peer):
    """Each method with kvpress scores in the fixture has its swaps checked by the tie rule below."""
    z, _ = peer
    assert {k.split("/")[1] for k in z.files if k.startswith("scores/")} == set(SCORED)


# ----------------------------------------------------------------------------------------------
# The model itself: our forward vs the HF transformers model on the same GGUF.

def test_logits_match_hf_transformers(smollm2, peer):
    config, params = smollm2
    z, _ = peer
    ids = jnp.asarray(z["logits/tokens"])[None]
    t = ids.shape[1]
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim)
    logits, _, _ = _forward(params, ids, jnp.arange(t, dtype=jnp.int32)[None], cache, config)
    logits = np.asarray(logits[0])
    np.testing.assert_allclose(logits[:, z["logits/vocab"]], z["logits/values"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(logits[-1], z["logits/last"], atol=1e-3, rtol=0)
    # the subset holds every position's top-32 ids, so this is the full-vocabulary greedy token
    assert (logits[:, z["logits/vocab"]].argmax(-1) == z["logits/values"].argmax(-1)).all()


def test_fixture_settings_are_our_defaults(peer):
    """The presses ran with kvpress's defaults, which are our policies' defaults."""
    _, settings = peer
    m = {k: v["settings"][f"{settings['ratios_removed'][0]:g}"] for k, v in settings["methods"].items()}
    assert (m["snapkv"]["window_size"], m["snapkv"]["kernel_size"]) == (SnapKV().window, SnapKV().kernel)
    assert m["streaming_llm"]["n_sink"] == StreamingLLM().n_sink


# ----------------------------------------------------------------------------------------------
# Kept indices per method.

def test_streaming_llm_matches_kvpress(peer, observed):
    for agree, ours, ref in _check_method("streaming_llm", _policies()["streaming_llm"], peer, observed).values():
        assert agree == 1.0                      # no scores, no ties: must be exact
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["knorm", "tova"])
def test_scorer_matches_kvpress_up_to_float_ties(name, peer, observed):
    z, _ = peer
    _assert_swaps_are_ties(name, _check_method(name, _policies()[name], peer, observed), z)


def test_knorm_scores_match_kvpress(peer, observed):
    z, _ = peer
    for p, obs in enumerate(observed):
        ours = np.asarray(obs.scores["knorm"][:, 0])
        np.testing.assert_allclose(ours, z[f"scores/knorm/{p}"], rtol=1e-5, atol=0)


def test_tova_scores_match_kvpress(peer, observed):
    z, _ = peer
    for p, obs in enumerate(observed):
        t = obs.t
        ours = np.asarray(obs.scores["tova"][:, 0])
        ref = z[f"scores/tova/{p}"]
        # the last token is protected in both (ours +inf, kvpress max+1); compare the rest
        np.testing.assert_allclose(ours[..., :t - 1], ref[..., :t - 1], atol=2e-5, rtol=0)
        assert np.isposinf(ours[..., t - 1]).all()


def test_snapkv_matches_kvpress(peer, observed):
    z, _ = peer
    _assert_swaps_are_ties("snapkv", _check_method("snapkv", _policies()["snapkv"], peer, observed), z)


def test_snapkv_scores_match_kvpress(peer, observed):
    """Pooled window scores agree with kvpress's, up to a constant factor (we sum over the window,
    kvpress averages), on every pre-window column, the kernel//2 columns at the window edge included
    (both zero the window columns before pooling)."""
    z, _ = peer
    pol = _policies()["snapkv"]
    for p, obs in enumerate(observed):
        t = obs.t
        ours = np.asarray(obs.scores["snapkv"][:, 0], np.float64)
        ref = z[f"scores/snapkv/{p}"].astype(np.float64)
        stop = t - pol.window
        o, r = ours[..., :stop], ref[..., :stop]
        o = o / o.sum(-1, keepdims=True)
        r = r / r.sum(-1, keepdims=True)
        np.testing.assert_allclose(o, r, atol=1e-6, rtol=1e-4)
        assert np.isposinf(ours[..., t - pol.window:]).all()


# ----------------------------------------------------------------------------------------------
# ExpectedAttention (kvpress's own method) and ThinK (key channels).

def test_expected_attention_defaults_are_kvpress(peer):
    _, settings = peer
    ref = settings["methods"]["expected_attention"]["settings"][f"{settings['ratios_removed'][0]:g}"]
    ours = ExpectedAttention()
    assert (ours.n_future_positions, ours.n_sink, ours.use_covariance, ours.use_vnorm, ours.epsilon) == (
        ref["n_future_positions"], ref["n_sink"], ref["use_covariance"], ref["use_vnorm"], ref["epsilon"])


def test_expected_attention_matches_kvpress(peer, observed):
    z, _ = peer
    _assert_swaps_are_ties("expected_attention",
                           _check_method("expected_attention", ExpectedAttention(), peer, observed), z)


def test_expected_attention_scores_match_kvpress(peer, observed):
    z, _ = peer
    pol = ExpectedAttention()
    for p, obs in enumerate(observed):
        ours = np.asarray(obs.scores["expected_attention"][:, 0], np.float64)
        ref = z[f"scores/expected_attention/{p}"].astype(np.float64)
        n = pol.n_sink                  # sinks: ours +inf, kvpress max+1
        assert np.isposinf(ours[..., :n]).all()
        scale = np.abs(ref[..., n:]).max(-1, keepdims=True)
        np.testing.assert_allclose(ours[..., n:] / scale, ref[..., n:] / scale, atol=1e-4, rtol=0)


def test_think_kept_channels_match_kvpress(peer, observed):
    """kvpress's ThinKPress alone prunes channels of ALL prompt keys; ours does it after its token
    eviction, so a budget of the whole prompt reproduces the standalone press."""
    z, settings = peer
    for p, obs in enumerate(observed):
        t = obs.t
        for r in settings["think_channel_ratios_removed"]:
            ref = z[f"kept/think/{r:g}/{p}"].astype(np.int64)
            pol = ThinK(pruning_ratio=r, query_window=32)
            assert ref.shape[-1] == obs.config.head_dim - pol.n_pruned(obs.config.head_dim)
            new, _ = _compress(pol, "think", obs, t)
            ours = np.sort(np.asarray(new.channels[:, 0]), axis=-1)
            agree = np.mean(ours == ref)
            assert agree >= MIN_AGREEMENT, f"think prompt {p} ratio {r}: channel agreement {agree:.4f}"
            np.testing.assert_array_equal(ours, ref)


# ----------------------------------------------------------------------------------------------
# End to end: the compressed cache then serves new tokens exactly as kvpress's compressed cache does.

def _continuation_policy(name: str, ratio: float):
    if name == "full":
        return None
    if name == "think":
        # kvpress zeroes the pruned channels of EVERY prompt key: no full-width recent tokens
        return ThinK(pruning_ratio=ratio, query_window=32, recent_size=0)
    return {**_policies(), "expected_attention": ExpectedAttention()}[name]


@pytest.mark.parametrize("name, ratio", [("full", 0.0), ("streaming_llm", 0.75), ("tova", 0.75),
                                         ("expected_attention", 0.5), ("think", 0.5)])
def test_continuation_logits_after_compression_match_kvpress(name, ratio, smollm2, peer, observed):
    """Prompt 0 compressed by the policy, then 8 more tokens at positions T.. (as kvpress's pipeline
    feeds a question after the compressed context): logits agree with HF + kvpress within 1e-3."""
    config, params = smollm2
    z, _ = peer
    obs = observed[0]
    t = obs.t
    cont = jnp.asarray(z["continuation/tokens"])[None]
    m = cont.shape[1]
    policy = _continuation_policy(name, ratio)
    if policy is None:
        cache = kvcache.resize(obs.cache, t + m)
    else:
        n = t if name == "think" else int(t * (1 - ratio))       # ThinK keeps every token
        cache, _ = _compress(policy, name, obs, n)
        cache = cache.resize(n + m) if hasattr(cache, "resize") else kvcache.resize(cache, n + m)
    positions = jnp.arange(t, t + m, dtype=jnp.int32)[None]
    logits, _, _ = forward(params, cont, positions, cache, config)
    vocab = z[f"continuation/{name}/{ratio:g}/vocab"]
    ref = z[f"continuation/{name}/{ratio:g}/values"]
    np.testing.assert_allclose(np.asarray(logits[0])[:, vocab], ref, atol=1e-3, rtol=0)
