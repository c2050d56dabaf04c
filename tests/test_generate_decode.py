"""kvjax.generate decode loop against an independent float64 numpy simulation of the same schedule.

The simulation (written here, sharing no code with kvjax/models) keeps an explicit per-(layer,
kv-head) list of (position, key, value), runs the tiny model token by token in float64, evicts
with the policy's formula computed in numpy, and decodes with the tokens kvjax generated:
- decode-time compression of window scorers (SnapKV, TOVA) keeps exactly the reference top-k,
  computed from the window attention of the last decode queries over the cache at that moment;
- non-rerotating policies decode from the prompt length even when the last prompt token was
  evicted from every head; re-rotating policies continue after their contiguous in-cache positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression, QueryBuffer, decode_window, init_query_buffer
from kvjax.generate import generate
from kvjax.policies import make_policy
from kvjax.policies.base import Budget, ScoringPolicy
from models.config import ModelConfig
from models.llama import init_params

CFG = ModelConfig(name="tiny-decode", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, ffn_dim=48, rope_theta=10000.0)
N_PROMPT = 64   # = generate's default bucket: no left padding


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(5), scale=0.3, stacked=True)


@pytest.fixture(scope="module")
def prompt():
    return np.random.RandomState(11).randint(0, CFG.vocab_size, size=N_PROMPT).tolist()


# ------------------------------------------------------------------------------------------------
# float64 numpy simulation

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    """x [t, heads, d] rotated by positions [t]: pairs (i, i + d/2) as complex numbers."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * np.asarray(pos, np.float64)[:, None, None] * freqs)
    return np.concatenate([z.real, z.imag], axis=-1)


class Sim:
    """Per-(layer, kv-head) caches as chronological lists of (position, key, value)."""

    def __init__(self, params, config):
        self.c = config
        self.emb = np.asarray(params["embed"], np.float64)
        self.fn = np.asarray(params["final_norm"], np.float64)
        self.head = self.emb.T if config.tie_embeddings else np.asarray(params["lm_head"], np.float64)
        self.lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
        self.cache = [[[] for _ in range(config.n_kv_heads)] for _ in range(config.n_layers)]

    def feed(self, tokens, positions):
        """Run tokens at positions; returns (logits [t, V], post-RoPE queries per layer [t, Hq, d])."""
        c, lay = self.c, self.lay
        hq, hkv, d = c.n_heads, c.n_kv_heads, c.head_dim
        t = len(tokens)
        x = self.emb[np.asarray(tokens)]
        qs = []
        for l in range(c.n_layers):
            h = _rms(x, lay["attn_norm"][l], c.norm_eps)
            q = _rope((h @ lay["wq"][l]).reshape(t, hq, d), positions, c.rope_theta)
            k = _rope((h @ lay["wk"][l]).reshape(t, hkv, d), positions, c.rope_theta)
            v = (h @ lay["wv"][l]).reshape(t, hkv, d)
            for j in range(t):
                for kv in range(hkv):
                    self.cache[l][kv].append((positions[j], k[j, kv], v[j, kv]))
            out = np.zeros((t, hq, d))
            for head in range(hq):
                probs, entries = self.probs(l, head, q[:, head], positions)
                out[:, head] = probs @ np.stack([e[2] for e in entries])
            x = x + out.reshape(t, hq * d) @ lay["wo"][l]
            h = _rms(x, lay["mlp_norm"][l], c.norm_eps)
            g = h @ lay["w_gate"][l]
            x = x + (g / (1 + np.exp(-g)) * (h @ lay["w_up"][l])) @ lay["w_down"][l]
            qs.append(q)
        return _rms(x, self.fn, c.norm_eps) @ self.head, qs

    def probs(self, l, head, q, qpos):
        """Softmax attention of queries q [w, d] at qpos [w] over the cache of `head`'s kv head."""
        entries = self.cache[l][head // (self.c.n_heads // self.c.n_kv_heads)]
        pos = np.array([e[0] for e in entries])
        s = q @ np.stack([e[1] for e in entries]).T / np.sqrt(self.c.head_dim)
        s = np.where(pos[None, :] <= np.asarray(qpos)[:, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True), entries

    def keep(self, l, kv, scores, n):
        """Keep the n best entries (chronological order preserved)."""
        order = np.argsort(-scores, kind="stable")[:n]
        self.cache[l][kv] = [self.cache[l][kv][i] for i in sorted(order)]

    def positions(self, l, kv):
        return sorted(int(e[0]) for e in self.cache[l][kv])


def snapkv_scores(sim, l, kv, window_q, window_pos, window, kernel):
    """SnapKV: summed window attention, GQA mean, window columns zeroed, avg-pool (zero padding,
    divide by kernel), newest `window` positions protected."""
    g = sim.c.n_heads // sim.c.n_kv_heads
    s = sum(sim.probs(l, kv * g + i, window_q[:, kv * g + i], window_pos)[0].sum(0) for i in range(g)) / g
    pos = np.array(sim.positions(l, kv))
    recent = pos > pos.max() - window
    s = np.where(recent, 0.0, s)
    pad = kernel // 2
    sp = np.concatenate([np.zeros(pad), s, np.zeros(pad)])
    pooled = np.array([sp[i:i + kernel].sum() / kernel for i in range(len(s))])
    return np.where(recent, np.inf, pooled)


def tova_scores(sim, l, kv, window_q, window_pos):
    """TOVA: the last query's attention averaged over ALL query heads; newest position protected."""
    s = np.mean([sim.probs(l, h, window_q[-1:, h], window_pos[-1:])[0][0] for h in range(sim.c.n_heads)], axis=0)
    pos = np.array(sim.positions(l, kv))
    return np.where(pos == pos.max(), np.inf, s)


def simulate(params, prompt, generated, score_fn, n_keep, interval, window):
    """Prefill, compress to n_keep, then teacher-force `generated` one token at a time, compressing
    with the last `window` decode queries whenever a head holds n_keep + interval entries.
    returns (sim, greedy next-token argmax after each fed token)."""
    sim = Sim(params, CFG)
    n = len(prompt)
    _, qs = sim.feed(prompt, np.arange(n))
    buffer = [(p, [q[p] for q in qs]) for p in range(n - window, n)]

    def compress():
        wpos = np.array([b[0] for b in buffer[-window:]])
        for l in range(CFG.n_layers):
            wq = np.stack([b[1][l] for b in buffer[-window:]])          # [w, Hq, d]
            scores = [score_fn(sim, l, kv, wq, wpos) for kv in range(CFG.n_kv_heads)]
            for kv in range(CFG.n_kv_heads):
                sim.keep(l, kv, scores[kv], n_keep)

    compress()
    buffer = []
    argmax = []
    for i, tok in enumerate(generated[:-1]):
        if len(sim.cache[0][0]) >= n_keep + interval:
            compress()
        logits, qs = sim.feed([tok], np.array([n + i]))
        argmax.append(int(np.argmax(logits[-1])))
        buffer.append((n + i, [q[0] for q in qs]))
    return sim, argmax


@pytest.mark.parametrize("name", ["snapkv", "tova"])
def test_decode_time_compression_keeps_reference_topk(params, prompt, name):
    window, kernel, n_keep, interval = 8, 3, 24, 8
    if name == "snapkv":
        policy = make_policy("snapkv", window=window, kernel=kernel)
        score_fn = lambda sim, l, kv, q, p: snapkv_scores(sim, l, kv, q, p, window, kernel)
    else:
        policy, window = make_policy("tova"), 1
        score_fn = tova_scores
    comp = Compression(policy, Budget(tokens=n_keep), when="decode", interval=interval)
    assert decode_window(comp) == window
    # 2 decode-time compressions (before feeding positions 72 and 80), then one more token
    res = generate(params, CFG, [prompt], 2 * interval + 2, compression=comp, eos_ids=())
    gen = res.tokens[0]
    sim, argmax = simulate(params, prompt, gen, score_fn, n_keep, interval, window)
    assert argmax == gen[1:], "greedy decoding over the compressed cache differs from the float64 simulation"
    cache = res.cache
    assert cache.capacity == n_keep + interval
    for l in range(CFG.n_layers):
        for kv in range(CFG.n_kv_heads):
            got = sorted(int(p) for p in np.asarray(cache.positions[l, 0, kv]) if p >= 0)
            assert got == sim.positions(l, kv), (l, kv)
    # the last compression really evicted decode-era tokens chosen by the window scores
    assert len(got) == n_keep + 1 and max(got) == N_PROMPT + 2 * interval


def test_query_buffer_holds_the_last_decode_queries():
    comp = Compression(make_policy("snapkv", window=4), Budget(tokens=8), when="decode", interval=4)
    buf = init_query_buffer(comp, CFG, 1)
    assert isinstance(buf, QueryBuffer) and buf.q_pre is None
    assert buf.q_rot.shape == (CFG.n_layers, 1, CFG.n_heads, 4, CFG.head_dim)
    assert init_query_buffer(Compression(make_policy("knorm"), Budget(tokens=8), when="decode"), CFG, 1) is None
    assert init_query_buffer(Compression(make_policy("snapkv"), Budget(tokens=8)), CFG, 1) is None  # not decode
    ea = Compression(make_policy("expected_attention"), Budget(tokens=8), when="decode", interval=16)
    assert decode_window(ea) == 16 and init_query_buffer(ea, CFG, 1).q_pre is not None


# ------------------------------------------------------------------------------------------------
# decode start position

@dataclasses.dataclass(frozen=True)
class KeepOldest(ScoringPolicy):
    """Test policy: keeps the oldest tokens, so the last prompt token is evicted from every head."""

    def score(self, obs):
        return -obs.cache.positions.astype(jnp.float32)


def test_decode_starts_at_prompt_length_when_last_token_evicted(params, prompt):
    n_keep, steps = 20, 8
    res = generate(params, CFG, [prompt], steps, compression=Compression(KeepOldest(), Budget(tokens=n_keep)),
                   eos_ids=())
    gen = res.tokens[0]
    pos = np.asarray(res.cache.positions[0, 0, 0])
    assert sorted(pos[pos >= 0].tolist()) == list(range(n_keep)) + list(range(N_PROMPT, N_PROMPT + steps - 1))

    def greedy(start):
        sim = Sim(params, CFG)
        sim.feed(prompt, np.arange(N_PROMPT))
        for l in range(CFG.n_layers):
            for kv in range(CFG.n_kv_heads):
                sim.cache[l][kv] = sim.cache[l][kv][:n_keep]
        out = []
        for i, tok in enumerate(gen[:-1]):
            logits, _ = sim.feed([tok], np.array([start + i]))
            out.append(int(np.argmax(logits[-1])))
        return out

    assert greedy(N_PROMPT) == gen[1:]
    # the old rule (one past the highest kept position) decodes differently: the test can tell
    assert greedy(n_keep) != gen[1:]


def test_rerotating_policy_continues_after_in_cache_positions(params, prompt):
    n_keep, steps = 20, 6
    comp = Compression(make_policy("streaming_llm", rerotate=True), Budget(tokens=n_keep))
    res = generate(params, CFG, [prompt], steps, compression=comp, eos_ids=())
    pos = np.asarray(res.cache.positions)
    for l in range(CFG.n_layers):
        for kv in range(CFG.n_kv_heads):
            p = pos[l, 0, kv]
            assert p[p >= 0].tolist() == list(range(n_keep + steps - 1))


def test_decode_time_compression_of_a_pruned_cache_is_a_clear_error(params, prompt):
    think = make_policy("think", query_window=8, token_policy=make_policy("snapkv", window=8))
    with pytest.raises(ValueError, match="cannot be compressed again"):
        generate(params, CFG, [prompt], 20, compression=Compression(think, Budget(tokens=24), "decode", 8), eos_ids=())
