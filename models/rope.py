"""Rotary position embeddings (rotate-half convention), plain and Llama-3 scaled."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """`[head_dim // 2]` float64 inverse frequencies, with Llama-3 scaling when given.

    Llama-3: wavelengths longer than original_max/low_freq_factor are divided by `factor`,
    shorter than original_max/high_freq_factor are kept, and the band between is interpolated."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv / scaling.factor + smooth * inv
    return np.where(wavelen > low_wavelen, inv / scaling.factor,
                    np.where(wavelen < high_wavelen, inv, interpolated))


def rope_angles(positions: jax.Array, config: ModelConfig, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape `positions.shape + (head_dim,)` (float32, halves duplicated).
    local: a sliding-window layer's base (`config.rope_local_theta`, no scaling; Gemma 3)."""
    theta, scaling = (config.rope_local_theta, None) if local else (config.rope_theta, config.rope_scaling)
    inv = jnp.asarray(inverse_frequencies(config.head_dim, theta, scaling), jnp.float32)
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, config: ModelConfig, local: bool = False) -> jax.Array:
    """Rotate `x [batch, heads, seq, head_dim]` by `positions [batch, seq]` (or `[batch, heads, seq]`);
    local: with the sliding-window layers' base (see `rope_angles`)."""
    if positions.ndim == 2:
        positions = positions[:, None, :]
    cos, sin = rope_angles(positions, config, local)
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
