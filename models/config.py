"""Model configurations for the Llama family (SmolLM2, Llama 3, Qwen2/3, Mistral) and Gemma 3.

A config is a frozen dataclass, hashable, so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


MLP_ACTIVATIONS = ("silu", "gelu_tanh")


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
        layers/q_norm, k_norm [L, head_dim]       (only when qk_norm, Qwen3, Gemma 3)
        layers/post_attn_norm, post_mlp_norm [L, d_model]  (only when post_norms, Gemma 3)
        layers/mlp_norm [L, d_model]
        layers/w_gate, w_up [L, d_model, ffn_dim]
        layers/w_down [L, ffn_dim, d_model]
        layers/w_attn_gate [L, d_model, n_heads * head_dim or n_heads]  (only when attn_gate)
        layers/b_attn_gate [L, n_heads * head_dim or n_heads]  (attn_gate and qkv_bias)

    attn_gate: "" (none), "elementwise" or "headwise": Gated Attention's sigmoid gate on the
    attention output (`models.gated_attention`).

    q/k output features are head-major with HF's rotate-half RoPE convention
    (feature i and i + head_dim/2 of a head form one rotation pair).

    Gemma 3 options (all off for the Llama family; see `models.gemma3`):
        embed_scale:  embeddings multiplied by sqrt(d_model) (in the parameter dtype).
        mlp_activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
        post_norms:   RMSNorm on the attention output and on the MLP output before each residual
                      add (`layers/post_attn_norm`, `layers/post_mlp_norm` [L, d_model]); `mlp_norm`
                      is then Gemma's pre-feedforward norm.
        query_pre_attn_scalar: attention scale query_pre_attn_scalar**-0.5 (None: head_dim**-0.5).
        local_layers, sliding_window: layers whose queries see only the last `sliding_window`
                      positions (their own included), with RoPE base `rope_local_theta` and no
                      rope scaling; the other layers are global (`rope_theta`, `rope_scaling`).
        final_logit_softcap: logits = cap * tanh(logits / cap) (None: none).
    Norm weights are stored as the factor the normalised input is multiplied by (Gemma's
    checkpoints store it minus one; `models.gemma3` adds the one when loading).
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
    embed_scale: bool = False
    mlp_activation: str = "silu"
    post_norms: bool = False
    query_pre_attn_scalar: Optional[float] = None
    sliding_window: int = 0
    local_layers: tuple[int, ...] = ()
    rope_local_theta: float = 10000.0
    final_logit_softcap: Optional[float] = None

    def __post_init__(self):
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        if self.local_layers and self.sliding_window <= 0:
            raise ValueError(f"local_layers {self.local_layers} need a positive sliding_window, got {self.sliding_window}")
        if any(not 0 <= i < self.n_layers for i in self.local_layers):
            raise ValueError(f"local_layers {self.local_layers} must lie in [0, n_layers={self.n_layers})")
        if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0:
            raise ValueError(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}")
        if self.final_logit_softcap is not None and self.final_logit_softcap <= 0:
            raise ValueError(f"final_logit_softcap must be positive, got {self.final_logit_softcap}")
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

GEMMA3_270M = ModelConfig(
    name="gemma3-270m", vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
    head_dim=256, ffn_dim=2048, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, qk_norm=True,
    max_position=32768, bos_token_id=2, eos_token_ids=(1, 106), embed_scale=True, mlp_activation="gelu_tanh",
    post_norms=True, query_pre_attn_scalar=256.0, sliding_window=512,
    local_layers=tuple(i for i in range(18) if (i + 1) % 6), rope_local_theta=10000.0,
)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SMOLLM2_135M, LLAMA3_8B, QWEN25_7B, MISTRAL_7B,
                                                       GEMMA3_270M)}
PRESETS["smollm2"] = SMOLLM2_135M


def get_config(name: str) -> ModelConfig:
    """Look up a preset by name; raises a ValueError listing the known names."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known presets: {sorted(PRESETS)}") from None
