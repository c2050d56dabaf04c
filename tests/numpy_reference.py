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


def reference_logits(params, config, tokens, at=None, duo=None, hidden=False) -> np.ndarray:
    """Logits [seq, vocab] float64 for one unpadded sequence `tokens [seq]`.

    at: optional positions to return logits for (`[n]` -> `[n, vocab]`), to save memory on long inputs.
    Handles qkv biases (Qwen2) and per-head q/k RMS norms before RoPE (Qwen3) when present.
    duo: optional (alpha [L, Hkv], sink, recent): every head's output is alpha * full attention +
    (1 - alpha) * attention restricted to positions < sink or > query - recent (DuoAttention).
    hidden: return the final normed hidden states [seq, d_model] instead of logits.
    Gated Attention: when the layers hold `w_attn_gate` [d_model, Hq * w] (+ `b_attn_gate`), head
    `head`'s output is multiplied by 1 / (1 + exp(-(h @ W + b)[:, head*w:(head+1)*w])), w = 1 or d."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else v) for k, v in params.items()}
    lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    t = len(tokens)
    hq, hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    pos = np.arange(t, dtype=np.float64)
    causal = np.tril(np.ones((t, t), bool))
    if duo is not None:
        rows, cols = np.arange(t)[:, None], np.arange(t)[None, :]
        streaming = causal & ((cols < duo[1]) | (rows - cols < duo[2]))
    x = p["embed"][np.asarray(tokens)]
    for l in range(config.n_layers):
        h = _rms(x, lay["attn_norm"][l], config.norm_eps)
        q, k, v = h @ lay["wq"][l], h @ lay["wk"][l], h @ lay["wv"][l]
        if "bq" in lay:
            q, k, v = q + lay["bq"][l], k + lay["bk"][l], v + lay["bv"][l]
        q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
        if "q_norm" in lay:
            q, k = _rms(q, lay["q_norm"][l], config.norm_eps), _rms(k, lay["k_norm"][l], config.norm_eps)
        q, k = _rope_complex(q, pos, config.rope_theta), _rope_complex(k, pos, config.rope_theta)
        out = np.empty((t, hq, d))

        def attend(head, kv, mask):
            s = q[:, head] @ k[:, kv].T / np.sqrt(d)
            s = np.where(mask, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            return (s / s.sum(-1, keepdims=True)) @ v[:, kv]

        for head in range(hq):
            kv = head // (hq // hkv)
            out[:, head] = attend(head, kv, causal)
            if duo is not None:
                a = float(duo[0][l][kv])
                out[:, head] = a * out[:, head] + (1 - a) * attend(head, kv, streaming)
            if "w_attn_gate" in lay:
                w = lay["w_attn_gate"].shape[-1] // hq
                z = h @ lay["w_attn_gate"][l][:, head * w:(head + 1) * w]
                if "b_attn_gate" in lay:
                    z = z + lay["b_attn_gate"][l][head * w:(head + 1) * w]
                out[:, head] = out[:, head] / (1.0 + np.exp(-z))
        x = x + out.reshape(t, hq * d) @ lay["wo"][l]
        h = _rms(x, lay["mlp_norm"][l], config.norm_eps)
        g = h @ lay["w_gate"][l]
        x = x + (g / (1 + np.exp(-g)) * (h @ lay["w_up"][l])) @ lay["w_down"][l]
    if at is not None:
        x = x[np.asarray(at)]
    x = _rms(x, p["final_norm"], config.norm_eps)
    if hidden:
        return x
    head = p["embed"].T if config.tie_embeddings else p["lm_head"]
    return x @ head
