"""Gated Attention (Qiu et al., Qwen, arXiv 2505.06708; qiuzh20/gated_attention): a sigmoid gate on
the attention output (the paper's G1 position), computed from the layer input.

    Y' = Y * sigmoid(X W_g [+ b_g])       per head, before the heads are concatenated and o_proj

X [batch, seq, d_model] is the post-`input_layernorm` hidden state of the current token (what q_proj
reads), Y [batch, q_heads, seq, head_dim] the SDPA output. A model option
(`ModelConfig.attn_gate`):
- "elementwise": `w_attn_gate` [d_model, q_heads * head_dim], one gate per channel (the paper's best);
- "headwise":    `w_attn_gate` [d_model, q_heads], one scalar gate per head;
- "" (default): no gate, no parameter, no computation.
`b_attn_gate` [width] exists when `config.qkv_bias` (the official `bias = config.qkv_bias`). Columns
are head-major (head h owns columns h*w .. h*w + w - 1). The official code fuses the gate into
q_proj, interleaved per kv group; `split_fused_q_proj` converts that layout to this one.

Converting a pretrained model (`convert`): the gate weights start at 0 (sigmoid = 1/2 for every
token) and o_proj is doubled, so the converted model computes exactly the original function; a
fine-tune of the gate alone (`python -m train.gated_attention`) then moves it. The effective
per-channel scale of the attention output is 2*sigmoid in [0, 2] (the paper's gate in [0, 1] times
the doubled o_proj).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig

Params = dict[str, Any]
GATES = ("elementwise", "headwise")
GATE_NAMES = ("w_attn_gate", "b_attn_gate")


def gate_width(config: ModelConfig, kind: str = "") -> int:
    """Gate columns per layer: q_heads * head_dim (elementwise) or q_heads (headwise)."""
    kind = kind or config.attn_gate
    if kind not in GATES:
        raise ValueError(f"attention gate must be one of {GATES}, got {kind!r}")
    return config.n_heads * (config.head_dim if kind == "elementwise" else 1)


def gate_shapes(config: ModelConfig, kind: str = "") -> dict[str, tuple[int, ...]]:
    """name -> shape of one layer's gate parameters."""
    w = gate_width(config, kind)
    shapes = {"w_attn_gate": (config.d_model, w)}
    if config.qkv_bias:
        shapes["b_attn_gate"] = (w,)
    return shapes


def gate_logits(lp: Params, h: jax.Array, n_heads: int) -> jax.Array:
    """The gate's pre-sigmoid values [batch, q_heads, seq, 1 or head_dim] from the normed layer
    input h [batch, seq, d_model] (float32)."""
    g = h.astype(jnp.float32) @ lp["w_attn_gate"].astype(jnp.float32)
    if "b_attn_gate" in lp:
        g = g + lp["b_attn_gate"].astype(jnp.float32)
    b, t, w = g.shape
    return g.reshape(b, t, n_heads, w // n_heads).transpose(0, 2, 1, 3)


def apply_gate(lp: Params, h: jax.Array, out: jax.Array, n_heads: int) -> jax.Array:
    """out [batch, q_heads, seq, head_dim] * sigmoid(gate) (computed in float32, returned in out's dtype)."""
    return (out.astype(jnp.float32) * jax.nn.sigmoid(gate_logits(lp, h, n_heads))).astype(out.dtype)


def convert(params: Params, config: ModelConfig, kind: str = "elementwise",
            gates: Params | None = None) -> tuple[ModelConfig, Params]:
    """A gated copy of a pretrained model: (config with `attn_gate=kind`, params with gate weights
    and o_proj doubled). gates: trained gate weights stacked over layers ({"w_attn_gate": [L, d, w]
    (+ "b_attn_gate" [L, w])}); None: zeros, i.e. exactly the original function. Works on either
    layer layout (tuple of per-layer dicts, or one stacked dict) and keeps it."""
    if config.attn_gate:
        raise ValueError(f"{config.name} already has an attention gate ({config.attn_gate})")
    gated = dataclasses.replace(config, attn_gate=kind)
    shapes = gate_shapes(gated)
    dtype = params["embed"].dtype
    if gates is None:
        gates = {n: jnp.zeros((config.n_layers, *s), dtype) for n, s in shapes.items()}
    check_gates(gates, gated)
    layers = params["layers"]
    if isinstance(layers, dict):
        new = {**layers, "wo": layers["wo"] * 2, **{n: jnp.asarray(g, layers["wo"].dtype) for n, g in gates.items()}}
    else:
        new = tuple({**lp, "wo": lp["wo"] * 2, **{n: jnp.asarray(g[i], lp["wo"].dtype) for n, g in gates.items()}}
                    for i, lp in enumerate(layers))
    return gated, {**params, "layers": new}


def check_gates(gates: Params, config: ModelConfig) -> None:
    """Clear errors for gate weights that do not fit `config` (a gated config)."""
    want = {n: (config.n_layers, *s) for n, s in gate_shapes(config).items()}
    if not isinstance(gates, dict) or set(gates) != set(want):
        raise ValueError(f"gate weights must be a dict with keys {sorted(want)}, got "
                         f"{sorted(gates) if isinstance(gates, dict) else type(gates).__name__}")
    for n, s in want.items():
        if tuple(np.shape(gates[n])) != s:
            raise ValueError(f"gate {n} has shape {tuple(np.shape(gates[n]))}, {config.name} with a "
                             f"{config.attn_gate} gate needs {s}")


def gates_of(params: Params) -> Params:
    """The gate weights of a gated params pytree, stacked over layers."""
    layers = params["layers"]
    if isinstance(layers, dict):
        return {n: layers[n] for n in GATE_NAMES if n in layers}
    return {n: jnp.stack([lp[n] for lp in layers]) for n in GATE_NAMES if n in layers[0]}


def split_fused_q_proj(fused: np.ndarray, config: ModelConfig, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The official checkpoint layout -> (wq [d, Hq*d_h], w_attn_gate [d, width]) in ours.

    fused [d_model, Hq*d_h + width] (x @ W form) is viewed per kv group as [Hkv, G*d_h | G*(1 or d_h)]
    (`modeling_qwen3.py`: q_proj output viewed as [B, T, Hkv, -1] and split) -> head-major."""
    d, hkv, g, hd = config.d_model, config.n_kv_heads, config.group_size, config.head_dim
    gw = hd if kind == "elementwise" else 1
    if fused.shape != (d, config.n_heads * (hd + gw)):
        raise ValueError(f"fused q_proj {fused.shape} != ({d}, {config.n_heads * (hd + gw)}) for a {kind} gate")
    per = np.asarray(fused).reshape(d, hkv, g * hd + g * gw)
    return per[:, :, :g * hd].reshape(d, -1), per[:, :, g * hd:].reshape(d, -1)
