"""LoCoCo: a learned 1-D convolution fuses every incoming chunk into a fixed-size cache
(Cai et al., "LoCoCo: Dropping In Convolutions for Long Context Compression", arXiv 2406.05317;
github VITA-Group/LoCoCo `llama/memory_compressor.py`; spec §10.1 of eviction_merging_learned.md).

Deployed on the chunk schedule (`Compression(LoCoCo..., Budget(tokens=mem_size), when="chunk")`):
after every prefill chunk each (layer, kv head) holds at most `mem_size` slots, whatever the
context length. Per (layer, batch, kv head), with hh = the column sums of this forward's attention
(the chunk's queries over memory + chunk; mean over the GQA group; the official `hh_scores`):

    heavy  = top-`keep` live slots by hh (keep = mem_size - M, M = int(mem_size (1 - hh_keep_rate)))
    NH     = the other live slots in slot (chronological) order, S = |NH|
    X      = concat(K_NH, V_NH) as [2d channels, S]        (zero outside the sequence: conv padding)
    C      = softmax_over_S( act( Conv1d_{2d -> M, kernel, pad (kernel-1)/2}(X) + b ) )     [M, S]
    R      = one-hot rows of the top-M NH slots by hh, in chronological order                [M, S]
    W      = (1 - lam) R + lam C          (lam: the learned "normalizer", init 0.5)
    memory = heavy slots as they are + M fused rows  K_mem = W K_NH,  V_mem = W V_NH

Keys are post-RoPE (regime (a): stored at original positions); a fused row keeps the position of
its one-hot token (rows of R), so causality and later chunks see it where R put it. With lam = 0
the cache is exactly top-`mem_size` eviction by the last forward's column sums. A head with no more
than `mem_size` live slots is left as it is (the official code compresses only above mem_size + 16).

In kvjax this is a merging policy (`merges = True`): shared selection keeps the top-`mem_size`
slots by hh (= heavy + the rows of R), then `merge` writes the fused keys / values into the R rows.
Weights, per layer: conv_w [L, M, 2d, kernel], conv_b [L, M], lam [L]; one conv shared by the
layer's kv heads (the official conv runs over (batch x heads)). Export: `save_compressor`
(meta.json + compressor.npz, float32 or float16), `load_compressor` (clear errors for another model).
Train: `python -m train.lococo`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.policies.attention_gate import _Frozen
from kvjax.policies.base import Observation, Observe, ScoringPolicy, group_reduce

FORMAT = "kvjax-lococo-compressor"
META_FILE = "meta.json"
WEIGHTS_FILE = "compressor.npz"
ACTIVATIONS = ("relu", "none")


@dataclasses.dataclass(frozen=True)
class CompressorSpec:
    """Shapes of one model's compressor. mem_size: slots per (layer, kv head); hh_keep_rate: the
    share kept as heavy hitters; kernel: conv width (odd: 'same' padding); act: after the conv."""

    model: str
    n_layers: int
    kv_heads: int
    head_dim: int
    mem_size: int = 64
    hh_keep_rate: float = 0.5
    kernel: int = 21
    act: str = "relu"

    def __post_init__(self):
        if self.mem_size < 2:
            raise ValueError(f"mem_size must be >= 2, got {self.mem_size}")
        if not 0 <= self.hh_keep_rate < 1:
            raise ValueError(f"hh_keep_rate must be in [0, 1), got {self.hh_keep_rate}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd width, got {self.kernel}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.fused < 1:
            raise ValueError(f"mem_size {self.mem_size} x (1 - hh_keep_rate {self.hh_keep_rate}) leaves no fused slot")

    @property
    def fused(self) -> int:
        """M: fused (convolution) slots; the official `mem_compress = int(mem_size * (1 - hh_keep_rate))`."""
        return int(self.mem_size * (1 - self.hh_keep_rate))

    @property
    def keep(self) -> int:
        return self.mem_size - self.fused

    @staticmethod
    def for_model(config, **kwargs) -> "CompressorSpec":
        return CompressorSpec(config.name, config.n_layers, config.n_kv_heads, config.head_dim, **kwargs)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        L, M = self.n_layers, self.fused
        return {"conv_w": (L, M, 2 * self.head_dim, self.kernel), "conv_b": (L, M), "lam": (L,)}


def init_compressor(spec: CompressorSpec, key: jax.Array, std: Optional[float] = None, lam: float = 0.5) -> dict:
    """conv weights normal(0, std) (the official init is randn, std = 1; default here
    1/sqrt(2d * kernel), so the softmax starts spread out), zero bias, lam = `lam` in every layer."""
    s = spec.shapes()
    std = (2 * spec.head_dim * spec.kernel) ** -0.5 if std is None else std
    return {"conv_w": std * jax.random.normal(key, s["conv_w"], jnp.float32),
            "conv_b": jnp.zeros(s["conv_b"], jnp.float32), "lam": jnp.full(s["lam"], lam, jnp.float32)}


def conv_mix(conv_w: jax.Array, conv_b: jax.Array, x: jax.Array, valid: jax.Array, act: str) -> jax.Array:
    """Mixing weights C = softmax_S(act(conv(x) + b)) over the valid positions.

    conv_w [M, 2d, k]; conv_b [M]; x [N, 2d, S] (zero at invalid positions); valid [N, S] (a
    prefix of each row) -> [N, M, S] float32 or wider (rows sum to 1 over the valid positions; 0 elsewhere)."""
    k = conv_w.shape[-1]
    ft = jnp.result_type(x.dtype, conv_w.dtype, jnp.float32)
    y = jax.lax.conv_general_dilated(x.astype(ft), conv_w.astype(ft), (1,), [(k // 2, k // 2)],
                                     dimension_numbers=("NCH", "OIH", "NCH"),
                                     precision=jax.lax.Precision.HIGHEST) + conv_b[None, :, None]
    if act == "relu":
        y = jax.nn.relu(y)
    y = jnp.where(valid[:, None, :], y, -jnp.inf)
    return jnp.where(valid[:, None, :], jax.nn.softmax(y, axis=-1), 0.0)


def fuse(w: dict, keys: jax.Array, values: jax.Array, valid: jax.Array, scores: jax.Array, keep: int,
         act: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's fusion (the formula above) over all its slots.

    w: that layer's {"conv_w" [M, 2d, k], "conv_b" [M], "lam" []}; keys / values [B, H, S, d];
    valid [B, H, S]; scores [B, H, S] (hh). returns (k_mem, v_mem [B, H, M, d] float32 (float64 for
    float64 inputs): the fused
    rows in chronological order of R's tokens; r_slot [B, H, M]: the slot of each row's one-hot
    token (-1 on every row of a head with no more than keep + M live slots: nothing is fused there))"""
    b, h, s, d = keys.shape
    m = w["conv_w"].shape[0]
    ft = jnp.result_type(keys.dtype, w["conv_w"].dtype, jnp.float32)
    sc = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-sc, axis=-1, stable=True), axis=-1)      # 0 = best; ties: older first
    heavy = valid & (rank < keep)
    nh = valid & ~heavy
    top_m = nh & (rank < keep + m)                                            # R's tokens
    slot = jnp.arange(s)
    order = jnp.argsort(jnp.where(nh, slot, s + slot), axis=-1)              # NH slots first, chronological
    nh_c = jnp.take_along_axis(nh, order, -1)
    k_c = jnp.where(nh_c[..., None], jnp.take_along_axis(keys, order[..., None], -2), 0).astype(ft)
    v_c = jnp.where(nh_c[..., None], jnp.take_along_axis(values, order[..., None], -2), 0).astype(ft)
    x = jnp.concatenate([k_c, v_c], -1).reshape(b * h, s, 2 * d).transpose(0, 2, 1)
    mix = conv_mix(w["conv_w"], w["conv_b"], x, nh_c.reshape(b * h, s), act).reshape(b, h, m, s)
    top_c = jnp.take_along_axis(top_m, order, -1)
    row = jnp.cumsum(top_c, -1) - 1                                           # R's row of each compacted slot
    r = ((row[..., None, :] == jnp.arange(m)[:, None]) & top_c[..., None, :]).astype(ft)
    wt = (1 - w["lam"]) * r + w["lam"] * mix
    k_mem = jnp.einsum("bhms,bhsd->bhmd", wt, k_c, precision=jax.lax.Precision.HIGHEST)
    v_mem = jnp.einsum("bhms,bhsd->bhmd", wt, v_c, precision=jax.lax.Precision.HIGHEST)
    has = (r.sum(-1) > 0) & (valid.sum(-1) > keep + m)[..., None]             # nothing to evict: no fusion
    r_slot = jnp.where(has, jnp.max(jnp.where(r > 0, order[..., None, :], -1), -1), -1).astype(jnp.int32)
    return k_mem, v_mem, r_slot


def check_compressor(w: dict, spec: CompressorSpec) -> None:
    want = spec.shapes()
    if not isinstance(w, dict) or set(w) != set(want):
        raise ValueError(f"LoCoCo weights must be a dict with keys {sorted(want)}, got "
                         f"{sorted(w) if isinstance(w, dict) else type(w).__name__}")
    for n, shape in want.items():
        if tuple(np.shape(w[n])) != shape:
            raise ValueError(f"LoCoCo {n} has shape {tuple(np.shape(w[n]))}, {spec.model} with mem_size "
                             f"{spec.mem_size} needs {shape}")


def save_compressor(directory, w: dict, spec: CompressorSpec, extra: Optional[dict] = None,
                    dtype: str = "float32") -> pathlib.Path:
    """meta.json + compressor.npz (`dtype` "float32" or "float16": half the bytes, for shipping)."""
    check_compressor(w, spec)
    if dtype not in ("float32", "float16"):
        raise ValueError(f"export dtype must be float32 or float16, got {dtype!r}")
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / WEIGHTS_FILE, **{k: np.asarray(jax.device_get(v), np.float32).astype(dtype) for k, v in w.items()})
    (d / META_FILE).write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(spec), "dtype": dtype,
                                           **(extra or {})}, indent=1))
    return d


def load_compressor(path, config) -> tuple[dict, CompressorSpec]:
    """(float32 weights, spec) saved by `save_compressor`; FileNotFoundError / ValueError with the
    reason (missing, not an export, another model)."""
    d = pathlib.Path(path)
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a LoCoCo export: expected {META_FILE} and {WEIGHTS_FILE} "
                                f"(train with `python -m train.lococo --out DIR`)")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / META_FILE}: not a LoCoCo export (format {meta.get('format')!r})")
    spec = CompressorSpec(**{f.name: meta[f.name] for f in dataclasses.fields(CompressorSpec)})
    if spec.model != config.name:
        raise ValueError(f"LoCoCo weights in {d} were trained for model {spec.model!r}, not {config.name!r}")
    mine = CompressorSpec.for_model(config, mem_size=spec.mem_size, hh_keep_rate=spec.hh_keep_rate,
                                    kernel=spec.kernel, act=spec.act)
    with np.load(d / WEIGHTS_FILE) as z:
        w = {k: jnp.asarray(z[k], jnp.float32) for k in z.files}
    check_compressor(w, mine)
    return w, spec


@dataclasses.dataclass(frozen=True)
class LoCoCo(ScoringPolicy):
    """Chunk-schedule fusion into `mem_size` slots (build with `from_dir` / `from_weights`; the budget
    must be `Budget(tokens=mem_size)`). weights: the compressor (None: scores only)."""

    weights: Optional[_Frozen] = None
    mem_size: int = 64
    keep: int = 32
    act: str = "relu"
    merges = True

    @property
    def observe(self) -> Observe:
        return Observe(column_sums=True)

    @staticmethod
    def from_weights(w: dict, spec: CompressorSpec) -> "LoCoCo":
        return LoCoCo(weights=_Frozen(w), mem_size=spec.mem_size, keep=spec.keep, act=spec.act)

    @staticmethod
    def from_dir(path, config, **kwargs) -> "LoCoCo":
        if kwargs:
            raise ValueError(f"lococo takes its hyperparameters from the export, not {sorted(kwargs)}")
        return LoCoCo.from_weights(*load_compressor(path, config))

    def score(self, obs: Observation) -> jax.Array:
        """hh: this forward's attention column sums, mean over the GQA group -> [1, B, Hkv, S]."""
        if obs.column_sums is None:
            raise ValueError("LoCoCo needs attention column sums (Observe(column_sums=True))")
        return group_reduce(obs.column_sums, obs.cache.positions.shape[-2])

    def merge(self, old: kvcache.KVCache, idx: jax.Array, scores: jax.Array, layer: int):
        """The kept slots' keys / values: heavy rows as they are, R's rows replaced by the fused rows."""
        if self.weights is None:
            raise ValueError("LoCoCo needs its trained compressor (LoCoCo.from_dir(path, config))")
        kept = idx.shape[-1]
        if kept != self.mem_size:
            raise ValueError(f"LoCoCo's compressor fuses into mem_size={self.mem_size} slots per head, but the "
                             f"budget keeps {kept}: use Budget(tokens={self.mem_size}) (--budget {self.mem_size})")
        w = jax.tree_util.tree_map(lambda a: a[layer], self.weights.tree)
        k_mem, v_mem, r_slot = fuse(w, old.keys, old.values, old.valid, scores, self.keep, self.act)
        safe = jnp.clip(idx, 0, old.capacity - 1)
        k = jnp.take_along_axis(old.keys, safe[..., None], -2).astype(k_mem.dtype)
        v = jnp.take_along_axis(old.values, safe[..., None], -2).astype(v_mem.dtype)
        hit = (idx[..., :, None] == r_slot[..., None, :]) & (r_slot[..., None, :] >= 0)   # [B, H, K, M]
        row = jnp.argmax(hit, -1)
        fused = hit.any(-1)[..., None]
        k = jnp.where(fused, jnp.take_along_axis(k_mem, row[..., None], -2), k)
        v = jnp.where(fused, jnp.take_along_axis(v_mem, row[..., None], -2), v)
        return k, v
