"""Attention-Gate: in-context eviction flags from a small learned attention module before each layer
(Zeng et al., arXiv 2410.12876; spec §3 of eviction_merging_learned.md; no public code).

Per layer l, from the layer's normed input h [B, T, d_model] (what q_proj reads):

    a = MHA'(h)        few heads (`heads`, `head_dim`) with own Q/K/V projections, bidirectional over
                       the valid context tokens (each flag sees the whole context)
    p = sigmoid(a @ Wo + h @ Wr + bo)  [B, Hkv, T]   retention probability per token and kv head

`h @ Wr` (a residual read-out of the token's own state) is our addition, not in the spec: without it
a freshly initialised MHA' attends near-uniformly over the whole context, so `a` -- and p -- is almost
the same for every token (a first trained version kept p within 0.002 of its head's median) and the
gradient that could separate tokens is second order (through Wq, Wk). Wr starts at zero.

Training (`python -m train.attention_gate`, frozen model): the flag f = 1[p >= threshold] masks
evicted tokens out of later queries' attention (a `local` window of recent keys and the token itself
always stay visible; the spec's "small local window" [unverified]), as do the first `sink` tokens
(attention sinks: our addition, a flag, 0 turns it off), with a straight-through estimator (forward:
f, backward: d p).

Deployment (`--policy attention_gate:gates=DIR`, prefill compression): score = p per slot; the kept
top-`budget` slots per (layer, kv-head) form a smaller cache (the evicted slots are freed); the
`local` most recent and the first `sink` tokens are protected (both default to the values the gates
were trained with, from meta.json). The gate's arrays are `kvjax.observation.Frozen`: the engine
passes them to its jitted forward as arguments (not compile-time constants). The gate reads the layer's raw input `x` (Observe(hidden))
and applies the model's input RMS norm, whose weights are folded into the gate's Q/K/V at load time
(`AttentionGate.from_dir(path, params, config)`): h @ W = rms(x) @ (diag(w_norm) W). The whole
prompt must be one forward (`prefill_only`: `when="prefill"`; `generate` does not chunk prompts for
policies observing hidden states).

Weights: {"wq", "wk", "wv": [L, d_model, heads*head_dim], "wo": [L, heads*head_dim, Hkv],
"wr": [L, d_model, Hkv], "bo": [L, Hkv]} saved by `save_gates` (meta.json + gates.npz, float32 or
float16), loaded by `load_gates` as float32 (clear errors for another model).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.observation import Frozen as _Frozen, Observe
from kvjax.policies.base import Observation, ScoringPolicy, newest_mask, oldest_mask, protect

GATES_FORMAT = "kvjax-attention-gate-evict"
META_FILE = "meta.json"
WEIGHTS_FILE = "gates.npz"


@dataclasses.dataclass(frozen=True)
class GateSpec:
    model: str
    n_layers: int
    d_model: int
    kv_heads: int
    heads: int = 2
    head_dim: int = 16

    @staticmethod
    def for_model(config, heads: int = 2, head_dim: int = 16) -> "GateSpec":
        return GateSpec(config.name, config.n_layers, config.d_model, config.n_kv_heads, heads, head_dim)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        L, d, w = self.n_layers, self.d_model, self.heads * self.head_dim
        return {"wq": (L, d, w), "wk": (L, d, w), "wv": (L, d, w), "wo": (L, w, self.kv_heads),
                "wr": (L, d, self.kv_heads), "bo": (L, self.kv_heads)}


def init_gates(spec: GateSpec, key: jax.Array, std: float = 0.02, bias: float = 0.0) -> dict:
    """normal(0, std) attention projections, zero residual read-out Wr, keep bias `bias` (0: p = 0.5,
    the flags start at the threshold, so the ranking decides from step 1; 3 keeps everything)."""
    keys = jax.random.split(key, 4)
    shapes = spec.shapes()
    out = {n: std * jax.random.normal(k, shapes[n], jnp.float32) for k, n in zip(keys, ("wq", "wk", "wv", "wo"))}
    out["wr"] = jnp.zeros(shapes["wr"], jnp.float32)
    out["bo"] = jnp.full(shapes["bo"], bias, jnp.float32)
    return out


def keep_logits(g: dict, h: jax.Array, valid: jax.Array, heads: int) -> jax.Array:
    """One layer's gate logits [B, Hkv, T] (float32). g: that layer's weights (no layer axis);
    h [B, T, d_model] the normed layer input; valid [B, T] bool (padding neither attends nor is attended)."""
    hf = h.astype(jnp.float32)
    b, t, _ = hf.shape
    split = lambda x: x.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)          # [B, n, T, e]
    q, k, v = split(hf @ g["wq"]), split(hf @ g["wk"]), split(hf @ g["wv"])
    s = jnp.einsum("bnte,bnse->bnts", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(valid[:, None, None, :], s, -1e30)
    a = jnp.einsum("bnts,bnse->bnte", jax.nn.softmax(s, axis=-1), v)
    a = a.transpose(0, 2, 1, 3).reshape(b, t, -1)
    return (a @ g["wo"] + hf @ g["wr"] + g["bo"]).transpose(0, 2, 1)


def check_gates(gates: dict, spec: GateSpec) -> None:
    want = spec.shapes()
    if not isinstance(gates, dict) or set(gates) != set(want):
        raise ValueError(f"Attention-Gate weights must be a dict with keys {sorted(want)}, got "
                         f"{sorted(gates) if isinstance(gates, dict) else type(gates).__name__}")
    for n, s in want.items():
        if tuple(np.shape(gates[n])) != s:
            raise ValueError(f"Attention-Gate {n} has shape {tuple(np.shape(gates[n]))}, {spec.model} needs {s}")


def save_gates(directory, gates: dict, spec: GateSpec, extra: Optional[dict] = None,
               dtype=np.float32) -> pathlib.Path:
    """meta.json (spec + `extra`, e.g. the trained sink / local) and gates.npz in `dtype`."""
    check_gates(gates, spec)
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / WEIGHTS_FILE, **{k: np.asarray(v, np.float32).astype(dtype) for k, v in gates.items()})
    (d / META_FILE).write_text(json.dumps({"format": GATES_FORMAT, **dataclasses.asdict(spec), **(extra or {})},
                                          indent=1))
    return d


def load_gates(path, config) -> tuple[dict, GateSpec]:
    """(float32 weights, spec) saved by `save_gates`; FileNotFoundError / ValueError with the reason."""
    d = pathlib.Path(path)
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not an Attention-Gate export: expected {META_FILE} and {WEIGHTS_FILE} "
                                f"(train with `python -m train.attention_gate --out DIR`)")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != GATES_FORMAT:
        raise ValueError(f"{d / META_FILE}: not an Attention-Gate export (format {meta.get('format')!r})")
    spec = GateSpec(**{f.name: meta[f.name] for f in dataclasses.fields(GateSpec)})
    if spec.model != config.name:
        raise ValueError(f"Attention-Gate weights in {d} were trained for model {spec.model!r}, not {config.name!r}")
    with np.load(d / WEIGHTS_FILE) as z:
        gates = {k: jnp.asarray(z[k], jnp.float32) for k in z.files}
    check_gates(gates, GateSpec.for_model(config, spec.heads, spec.head_dim))
    return gates, spec


@dataclasses.dataclass(frozen=True)
class AttentionGate(ScoringPolicy):
    """Prefill eviction by trained Attention-Gates (build with `from_dir` or `from_gates`).
    heads: the gate's attention heads; local: most recent tokens always kept; sink: first tokens
    always kept (our addition); eps: the model's RMS eps."""

    weights: Optional[_Frozen] = None
    heads: int = 2
    local: int = 8
    sink: int = 4
    eps: float = 1e-5
    prefill_only = True

    @property
    def observe(self) -> Observe:
        return Observe(hidden=True)

    @staticmethod
    def from_gates(gates: dict, spec: GateSpec, params, config, **kwargs) -> "AttentionGate":
        """Fold each layer's input-norm weight into the gate's Q/K/V (params: the model's)."""
        from models.llama import layer_params
        norms = jnp.stack([lp["attn_norm"].astype(jnp.float32) for lp in layer_params(params)])     # [L, d]
        folded = {**gates, **{n: gates[n] * norms[:, :, None] for n in ("wq", "wk", "wv", "wr")}}
        return AttentionGate(weights=_Frozen(folded), heads=spec.heads, eps=config.norm_eps, **kwargs)

    @staticmethod
    def from_dir(path, params, config, **kwargs) -> "AttentionGate":
        """local / sink default to what the gates were trained with (meta.json)."""
        gates, spec = load_gates(path, config)
        meta = json.loads((pathlib.Path(path) / META_FILE).read_text())
        trained = {k: int(meta[k]) for k in ("local", "sink") if k in meta}
        return AttentionGate.from_gates(gates, spec, params, config, **{**trained, **kwargs})

    def probabilities(self, obs: Observation) -> jax.Array:
        """Retention probabilities of this forward's tokens [L=1, B, Hkv, T] and valid [B, T]."""
        x = obs.hidden[0].astype(jnp.float32)                                   # [B, T, d]
        xn = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        g = jax.tree_util.tree_map(lambda a: jnp.take(a, obs.layer, axis=0), self.weights.tree)
        t = x.shape[1]
        n_real = obs.cache.positions[0].max(axis=(1, 2)) + 1                     # [B] (left padding)
        valid = jnp.arange(t)[None, :] >= t - n_real[:, None]
        return jax.nn.sigmoid(keep_logits(g, xn, valid, self.heads)), valid

    def score(self, obs: Observation) -> jax.Array:
        if obs.hidden is None or self.weights is None:
            raise ValueError("AttentionGate needs its trained weights (AttentionGate.from_dir) and Observe(hidden)")
        p, _ = self.probabilities(obs)                                          # [B, Hkv, T]
        pos = obs.cache.positions[0]                                            # [B, Hkv, S]
        t = p.shape[-1]
        idx = t - 1 - (pos.max(-1, keepdims=True) - pos)                        # slot -> token of this forward
        ok = (pos >= 0) & (idx >= 0)
        s = jnp.where(ok, jnp.take_along_axis(p, jnp.clip(idx, 0, t - 1), axis=-1), -jnp.inf)
        return protect(s, newest_mask(pos, self.local) | oldest_mask(pos, self.sink))[None]
