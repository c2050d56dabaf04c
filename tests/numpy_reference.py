"""An independent float64 numpy forward of the Llama family, written for the tests.

It shares no code with `models/`: RoPE is applied as a complex rotation of the (i, i + d/2)
feature pairs, attention is computed with an explicit causal mask over the full sequence.
"""
from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_complex(x, pos, theta):
    """x [seq, heads, d] float64 rotated by positions [seq] as complex pairs (i, i + d/2)."""
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * pos[:, None, None] * freqs)[:, :, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_logits(params, config, tokens) -> np.ndarray:
    """Logits [seq, vocab] float64 for one unpadded sequence `tokens [seq]`."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else v) for k, v in params.items()}
    lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    t = len(tokens)
    hq, hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    pos = np.arange(t, dtype=np.float64)
    causal = np.tril(np.ones((t, t), bool))
    x = p["embed"][np.asarray(tokens)]
    for l in range(config.n_layers):
        h = _rms(x, lay["attn_norm"][l], config.norm_eps)
        q = (h @ lay["wq"][l]).reshape(t, hq, d)
        k = (h @ lay["wk"][l]).reshape(t, hkv, d)
        v = (h @ lay["wv"][l]).reshape(t, hkv, d)
        q, k = _rope_complex(q, pos, config.rope_theta), _rope_complex(k, pos, config.rope_theta)
        out = np.empty((t, hq, d))
        for head in range(hq):
            kv = head // (hq // hkv)
            s = q[:, head] @ k[:, kv].T / np.sqrt(d)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(t, hq * d) @ lay["wo"][l]
        h = _rms(x, lay["mlp_norm"][l], config.norm_eps)
        g = h @ lay["w_gate"][l]
        x = x + (g / (1 + np.exp(-g)) * (h @ lay["w_up"][l])) @ lay["w_down"][l]
    x = _rms(x, p["final_norm"], config.norm_eps)
    head = p["embed"].T if config.tie_embeddings else p["lm_head"]
    return x @ head
