"""Model configurations for the Llama family (SmolLM2, Llama 3, Qwen2/3, Mistral).

A config is a frozen dataclass, hashable, so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder.

    Parameter pytree layout produced by `models.loading` and consumed by `models.llama`
    (weights are stored as `x @ W`, i.e. `[in, out]`; layer weights are stacked on axis 0):

        embed        [vocab, d_model]
        final_norm   [d_model]
        lm_head      [d_model, vocab]            (absent when tie_embeddings)
        layers/attn_norm [L, d_model]
        layers/wq    [L, d_model, n_heads * head_dim]
        layers/wk    [L, d_model, n_kv_heads * head_dim]
        layers/wv    [L, d_model, n_kv_heads * head_dim]
        layers/wo    [L, n_heads * head_dim, d_model]
        layers/bq, bk, bv  [L, heads * head_dim]  (only when qkv_bias, Qwen2)
        layers/q_norm, k_norm [L, head_dim]       (only when qk_norm, Qwen3)
        layers/mlp_norm [L, d_model]
        layers/w_gate, w_up [L, d_model, ffn_dim]
        layers/w_down [L, ffn_dim, d_model]
        layers/w_attn_gate [L, d_model, n_heads * head_dim or n_heads]  (only when attn_gate)
        layers/b_attn_gate [L, n_heads * head_dim or n_heads]  (attn_gate and qkv_bias)

    attn_gate: "" (none), "elementwise" or "headwise": Gated Attention's sigmoid gate on the
    attention output (`models.gated_attention`).

    q/k output features are head-major with HF's rotate-half RoPE convention
    (feature i and i + head_dim/2 of a head form one rotation pair).
    """

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position: int = 8192
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    attn_gate: str = ""

    def __post_init__(self):
        if self.attn_gate not in ("", "elementwise", "headwise"):
            raise ValueError(f"attn_gate must be '', 'elementwise' or 'headwise', got {self.attn_gate!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.n_heads // self.n_kv_heads


SMOLLM2_135M = ModelConfig(
    name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
    head_dim=64, ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
    max_position=8192, bos_token_id=1, eos_token_ids=(2,),
)

LLAMA3_8B = ModelConfig(
    name="llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    head_dim=128, ffn_dim=14336, rope_theta=500000.0, rope_scaling=RopeScaling(), norm_eps=1e-5,
    max_position=131072, bos_token_id=128000, eos_token_ids=(128001, 128009),
)

QWEN25_7B = ModelConfig(
    name="qwen2.5-7b", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
    head_dim=128, ffn_dim=18944, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
    max_position=32768, eos_token_ids=(151643, 151645),
)

MISTRAL_7B = ModelConfig(
    name="mistral-7b", vocab_size=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    head_dim=128, ffn_dim=14336, rope_theta=1000000.0, norm_eps=1e-5, max_position=32768,
    bos_token_id=1, eos_token_ids=(2,),
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SMOLLM2_135M, LLAMA3_8B, QWEN25_7B, MISTRAL_7B)}
PRESETS["smollm2"] = SMOLLM2_135M


def get_config(name: str) -> ModelConfig:
    """Look up a preset by name; raises a ValueError listing the known names."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known presets: {sorted(PRESETS)}") from None
