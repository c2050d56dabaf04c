"""Attention-sink protection for KIVI (opt-in extension, not part of KIVI): the first `sink` tokens
of every row (positions 0..sink-1) are kept in full precision and **left out of the quantized groups**.

Why: SmolLM2 puts most attention mass on the first token; KIVI quantizes it like any other key/value
(its key widens group 0's per-channel range, and its 2-bit error is weighted by that mass in every
later query). KVQuant (`--first_few_fp16`) and RotateKV (massive-activation pivots) protect such
tokens; KIVI does not. Measured on SmolLM2 + KJV in docs/quant_quality.md.

Mechanics (a wrapper, so `KIVICache` and its fused decode kernel are unchanged): `append` writes
tokens with 0 <= position < sink into `k_sink`/`v_sink` at index = position, and hands the inner KIVI
cache a *neutral placeholder* in their place (masked out of attention by `positions`: a slot of the inner
cache whose position is < sink is a placeholder) with a key/value equal to the mean of the chunk's other real tokens (inside every per-channel min/max, so
it does not widen a key group's range; zero if the chunk has no other real token). `attend`
dequantizes the inner cache and attends over [sinks, inner] with the XLA reference path (the fused
KIVI kernel does not see the sinks). Memory: the inner cache + sink * 2 * head_dim fp values + positions.

Layout (per layer slice; the stacked cache adds a leading `layers` axis):
    inner  kvjax.quant.kivi.KIVICache
    k_sink, v_sink [batch, kv_heads, sink, head_dim] cache dtype (post-RoPE keys)
    sink_pos [batch, kv_heads, sink] int32 (-1 = not filled)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.quant import kivi, packing


@dataclasses.dataclass(frozen=True)
class KIVISinkCache:
    inner: kivi.KIVICache
    k_sink: jax.Array
    v_sink: jax.Array
    sink_pos: jax.Array

    @property
    def sink(self) -> int:
        return self.k_sink.shape[-2]

    @property
    def lengths(self):
        return self.inner.lengths

    @property
    def capacity(self) -> int:
        return self.inner.capacity + self.sink

    @property
    def positions(self) -> jax.Array:
        """[..., sink + inner capacity]: the sinks, then the inner slots (placeholders masked: -1)."""
        inner = self.inner.positions
        return jnp.concatenate([self.sink_pos, jnp.where(inner < self.sink, -1, inner)], axis=-1)

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes() + sum(int(x.size) * x.dtype.itemsize
                                               for x in (self.k_sink, self.v_sink, self.sink_pos))

    def append(self, keys, values, positions, keys_pre_rope=None) -> "KIVISinkCache":
        """keys (post-RoPE), values `[batch, kv_heads, new, d]`, positions `[batch, new]`."""
        if keys.shape != values.shape or keys.ndim != 4 or keys.shape[-1] != self.k_sink.shape[-1]:
            raise ValueError(f"keys {keys.shape} / values {values.shape} must be [batch, kv_heads, new, "
                             f"{self.k_sink.shape[-1]}]")
        packing.check_finite("append keys/values", keys, values)
        s = self.sink
        is_sink = (positions >= 0) & (positions < s)                          # [B, n]
        other = ((positions >= s)[:, None, :, None]).astype(jnp.float32)      # real non-sink tokens
        cnt = jnp.maximum(jnp.sum(other, axis=2, keepdims=True), 1.0)
        k_fill = jnp.sum(keys.astype(jnp.float32) * other, axis=2, keepdims=True) / cnt
        v_fill = jnp.sum(values.astype(jnp.float32) * other, axis=2, keepdims=True) / cnt
        m = is_sink[:, None, :, None]
        k_in = jnp.where(m, k_fill, keys).astype(keys.dtype)
        v_in = jnp.where(m, v_fill, values).astype(values.dtype)
        inner = self.inner.append(k_in, v_in, positions)
        idx = jnp.where(is_sink, positions, s)                                # s = dropped
        idx = jnp.broadcast_to(idx[:, None, :], keys.shape[:3])

        def put(dst, src):
            return jax.vmap(jax.vmap(lambda a, i, u: a.at[i].set(u.astype(a.dtype), mode="drop")))(dst, idx, src)

        pos = jnp.broadcast_to(positions[:, None, :], keys.shape[:3]).astype(jnp.int32)
        return dataclasses.replace(self, inner=inner, k_sink=put(self.k_sink, keys), v_sink=put(self.v_sink, values),
                                   sink_pos=put(self.sink_pos, pos))

    def attend(self, q, query_positions, *, observe, backend="auto", rope=None):
        from kvjax.attention import attend
        k, v = kivi.dequantize(self.inner)
        k = jnp.concatenate([self.k_sink.astype(k.dtype), k], axis=-2)
        v = jnp.concatenate([self.v_sink.astype(v.dtype), v], axis=-2)
        return attend(q, k, v, self.positions, query_positions, observe=observe, backend=backend)

    def resize(self, capacity: int) -> "KIVISinkCache":
        return dataclasses.replace(self, inner=self.inner.resize(max(capacity - self.sink, 1)))


jax.tree_util.register_dataclass(KIVISinkCache, data_fields=["inner", "k_sink", "v_sink", "sink_pos"],
                                 meta_fields=[])


def with_sink(inner: kivi.KIVICache, sink: int, dtype=jnp.float32) -> KIVISinkCache:
    """Wrap an empty stacked KIVI cache `[layers, batch, kv_heads, ...]` with `sink` fp sink slots."""
    if sink <= 0:
        raise ValueError(f"sink must be a positive number of tokens, got {sink}")
    lead = inner.lengths.shape
    d = inner.k_resid.shape[-1]
    return KIVISinkCache(inner, jnp.zeros(lead + (sink, d), dtype), jnp.zeros(lead + (sink, d), dtype),
                         jnp.full(lead + (sink,), -1, jnp.int32))
