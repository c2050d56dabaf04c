"""Train DuoAttention's per-(layer, kv-head) gates on a frozen backbone (Xiao et al., arXiv 2410.10819;
mit-han-lab/duo-attention `duo_attn/train.py`, `duo_attn/patch/llama.py`).

    python -m train.duo --config configs/duo_smollm2.json --out runs/duo [--steps N]

Gates: alpha [L, Hkv] (init 1.0), one per kv head, shared by its query heads; clamped to [0, 1]
after every update. Two passes over the same tokens:
- full:  the frozen model (no gradient);
- mixed: every head's attention output is  alpha * FullAttn + (1 - alpha) * StreamAttn  before
  o_proj (`DuoMix`, passed as `models.llama.forward(..., attn_mod=)`), StreamAttn being causal
  attention restricted to the first `sink` positions and the last `recent` (training: 128 / 256;
  token-exact masks, where the official kernel rounds to 128-token blocks).
Loss (`train.py`, `duo_attn/loss.py`), h the final normed hidden states [B, T, d_model]:
    L = sum_{label tokens} mean_d (h_full - h_mixed)^2 / N_labels  +  reg_weight * mean |alpha|
Optimizer: AdamW (wd 0, betas torch's 0.9 / 0.999), lr 0.02, the official warmup / flat / decay
schedule (`TrainConfig(lr_schedule="duo")`), no gradient clipping. Data: `train.duo_data`.

Outputs under --out: ckpt/ (Orbax, resumable), metrics.jsonl, gates/ (Orbax: alpha alone),
full_attention_heads.tsv (the official layout: one line per layer, alphas tab-separated),
pattern.json (the binarised pattern + alphas + model, for `--policy
duo_attention:pattern_file=<out>/pattern.json`), summary.json.
Binarisation (`duo_attn/utils.py::sparsify_attention_heads`): alpha clipped to [0, 1] plus 1e-6
uniform noise (tie-break); retrieval heads are those >= quantile(alpha, sparsity), or >= threshold
(0.5) when no sparsity is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.attention import NEG_INF
from kvjax.policies.duo_attention import DuoAttention
from models.config import ModelConfig
from models.llama import forward, stacked_layer_params
from train.duo_data import PasskeyConfig, make_batch
from train.loop import TrainConfig, train

DUO_TRAIN = TrainConfig(steps=2000, batch_size=1, lr=0.02, warmup_steps=0, b1=0.9, b2=0.999, weight_decay=0.0,
                        clip_value=0.0, lr_schedule="duo", dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class DuoTrainConfig:
    """model: "smollm2", a GGUF/HF path, or "tiny" (`tiny` dict fields, see train.locret.load_backbone).
    sink / recent: the streaming attention of training (official 128 / 256); reg_weight: lambda of
    the L1 term; init: initial alpha; sparsity: quantile of the exported pattern (None: threshold)."""

    model: str = "smollm2"
    tiny: tuple = ()
    sink: int = 128
    recent: int = 256
    reg_weight: float = 0.05
    init: float = 1.0
    sparsity: Optional[float] = 0.5
    threshold: float = 0.5
    deploy_sink: int = 64
    deploy_recent: int = 256
    data: PasskeyConfig = PasskeyConfig()
    train: TrainConfig = DUO_TRAIN

    def __post_init__(self):
        if self.sink < 0 or self.recent <= 0:
            raise ValueError(f"need sink >= 0 and recent > 0, got {self.sink}, {self.recent}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if self.sparsity is not None and not 0 <= self.sparsity <= 1:
            raise ValueError(f"sparsity must be in [0, 1], got {self.sparsity}")


def load_config(path, **overrides) -> DuoTrainConfig:
    raw = json.loads(pathlib.Path(path).read_text())
    data = PasskeyConfig(**raw.pop("data", {}))
    tr = {**dataclasses.asdict(DUO_TRAIN), **raw.pop("train", {})}
    tr.update({k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}
               and v is not None})
    raw.update({k: v for k, v in overrides.items() if k in {"sparsity", "threshold"} and v is not None})
    tiny = tuple(sorted(raw.pop("tiny", {}).items()))
    unknown = set(raw) - {f.name for f in dataclasses.fields(DuoTrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
    return DuoTrainConfig(**raw, tiny=tiny, data=data, train=TrainConfig(**tr))


# ----------------------------------------------------------------------------------------------
# Mixed attention.

def streaming_mask(slot_positions: jax.Array, query_positions: jax.Array, sink: int, recent: int) -> jax.Array:
    """[B, Hkv, T, S] bool: slot live, not after the query, and among the first `sink` positions
    or the last `recent` up to the query (q - s < recent). slot_positions [B, Hkv, S], query [B, T]."""
    sp = slot_positions[:, :, None, :]
    qp = query_positions[:, None, :, None]
    return (sp >= 0) & (sp <= qp) & ((sp < sink) | (qp - sp < recent))


def masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped attention in float32: q [B, Hq, T, d] (post-RoPE), keys / values [B, Hkv, S, d],
    mask [B, Hkv, T, S] -> [B, Hq, T, d] float32 (rows with no visible slot give 0)."""
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, t, d).astype(jnp.float32)
    logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys.astype(jnp.float32)) * d ** -0.5
    m = mask[:, :, None]
    p = jnp.where(m, jax.nn.softmax(jnp.where(m, logits, NEG_INF), axis=-1), 0.0)
    return jnp.einsum("bhgts,bhsd->bhgtd", p, values.astype(jnp.float32)).reshape(b, hq, t, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoMix:
    """`forward(..., attn_mod=DuoMix(alpha [L, Hkv], sink, recent))`: every head's attention output
    becomes alpha * full + (1 - alpha) * streaming (its kv head's alpha). Needs a dense KVCache."""

    alpha: jax.Array
    sink: int = dataclasses.field(metadata=dict(static=True), default=128)
    recent: int = dataclasses.field(metadata=dict(static=True), default=256)

    def attention(self, h, q, positions, cache, out):
        if not isinstance(cache, kvcache.KVCache):
            raise ValueError(f"DuoMix needs a dense KVCache, got {type(cache).__name__}")
        if self.alpha.shape != (cache.keys.shape[1],):
            raise ValueError(f"DuoMix: alpha {self.alpha.shape} per layer, the cache has {cache.keys.shape[1]} "
                             f"kv heads")
        stream = masked_attention(q, cache.keys, cache.values,
                                  streaming_mask(cache.positions, positions, self.sink, self.recent))
        a = jnp.repeat(self.alpha.astype(jnp.float32), q.shape[1] // self.alpha.shape[0])[None, :, None, None]
        return (a * out.astype(jnp.float32) + (1 - a) * stream).astype(out.dtype)


# ----------------------------------------------------------------------------------------------
# Loss.

def distill_loss(h_full: jax.Array, h_mixed: jax.Array, label_mask: jax.Array) -> jax.Array:
    """sum over label tokens of mean_d (h_full - h_mixed)^2, / number of label tokens.
    h [B, T, D], label_mask [B, T] bool."""
    per_tok = jnp.mean((h_full.astype(jnp.float32) - h_mixed.astype(jnp.float32)) ** 2, axis=-1)
    n = jnp.maximum(label_mask.sum(), 1)
    return jnp.sum(jnp.where(label_mask, per_tok, 0.0)) / n


def clamp(alpha: jax.Array) -> jax.Array:
    return jnp.clip(alpha, 0.0, 1.0)


def make_loss(config: ModelConfig, cfg: DuoTrainConfig):
    dtype = cfg.train.compute_dtype

    def loss_fn(alpha, frozen, batch):
        tokens, mask = batch["tokens"], batch["label_mask"]                 # [B, T] int32, bool
        b, t = tokens.shape
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)
        cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim, dtype)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h_full, _, _ = forward(params, tokens, pos, cache, config, return_hidden=True, attention="xla")
        h_mix, _, _ = forward(params, tokens, pos, cache, config, return_hidden=True, attention="xla",
                              attn_mod=DuoMix(alpha, cfg.sink, cfg.recent))
        distill = distill_loss(jax.lax.stop_gradient(h_full), h_mix, mask)
        reg = jnp.mean(jnp.abs(alpha))
        return distill + cfg.reg_weight * reg, {"distill": distill, "reg": reg, "alpha_min": alpha.min(),
                                                 "alpha_mean": alpha.mean()}
    return loss_fn


# ----------------------------------------------------------------------------------------------
# Export.

def binarise(alpha, sparsity: Optional[float] = None, threshold: float = 0.5, seed: int = 0,
             **policy_kwargs) -> DuoAttention:
    """The deployed DuoAttention policy from alpha [L, Hkv]: clipped, plus 1e-6 uniform noise (the
    official tie-break), then quantile(sparsity) or the fixed threshold (`DuoAttention.from_alphas`)."""
    a = np.clip(np.asarray(alpha, np.float64), 0.0, 1.0)
    a = a + np.random.default_rng(seed).uniform(0, 1e-6, a.shape)
    return DuoAttention.from_alphas(a, sparsity=sparsity, threshold=threshold, **policy_kwargs)


def export(out, alpha, config: ModelConfig, cfg: DuoTrainConfig, extra: Optional[dict] = None) -> DuoAttention:
    """Write gates/ (Orbax), full_attention_heads.tsv and pattern.json; returns the deployed policy."""
    import orbax.checkpoint as ocp
    out = pathlib.Path(out).absolute()
    alpha = np.asarray(alpha, np.float32)
    if alpha.shape != (config.n_layers, config.n_kv_heads):
        raise ValueError(f"alpha {alpha.shape} does not match {config.name}: "
                         f"[{config.n_layers}, {config.n_kv_heads}]")
    policy = binarise(alpha, cfg.sparsity, cfg.threshold, sink=cfg.deploy_sink, recent=cfg.deploy_recent)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "gates", {"alpha": alpha}, force=True)
    (out / "full_attention_heads.tsv").write_text(
        "".join("\t".join(f"{v:.6f}" for v in row) + "\n" for row in alpha))
    meta = {"model": config.name, "n_layers": config.n_layers, "kv_heads": config.n_kv_heads,
            "pattern": [list(r) for r in policy.pattern], "alphas": alpha.tolist(), "sparsity": cfg.sparsity,
            "threshold": None if cfg.sparsity is not None else cfg.threshold,
            "retrieval_fraction": float(np.mean(policy.pattern)), "train_sink": cfg.sink,
            "train_recent": cfg.recent, **(extra or {})}
    (out / "pattern.json").write_text(json.dumps(meta))
    return policy


def load_gates(path) -> np.ndarray:
    """alpha [L, Hkv] from an exported gates/ directory (Orbax)."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        return np.asarray(ckptr.restore(pathlib.Path(path).absolute())["alpha"])


# ----------------------------------------------------------------------------------------------
# Run.

def run(cfg: DuoTrainConfig, out, progress: bool = True, die_after=None) -> tuple[dict, np.ndarray]:
    """Training (resumable) and export. Returns (summary, alpha [L, Hkv])."""
    from train.locret import load_backbone
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config, params = load_backbone(cfg)
    params = {**params, "layers": stacked_layer_params(params)}
    alpha = jnp.full((config.n_layers, config.n_kv_heads), cfg.init, jnp.float32)
    batch_fn = lambda step: {k: jnp.asarray(v) for k, v in
                             make_batch(cfg.data, "train", step, cfg.train.batch_size).items()}
    alpha, history = train(make_loss(config, cfg), alpha, params, batch_fn, cfg.train, ckpt_dir=out / "ckpt",
                           progress=progress, die_after=die_after, project=clamp)
    policy = export(out, alpha, config, cfg, {"steps": cfg.train.steps})
    tokens = cfg.train.steps * cfg.train.batch_size * sum(cfg.data.lengths) / cfg.data.n_lengths
    summary = {"model": config.name, "steps": cfg.train.steps, "approx_tokens": int(tokens),
               "total_s": time.perf_counter() - t0, "final": history[-1] if history else None,
               "retrieval_fraction": float(np.mean(policy.pattern)), "backend": jax.default_backend()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary, np.asarray(alpha)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.duo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--ckpt-every", type=int, dest="ckpt_every")
    ap.add_argument("--sparsity", type=float, help="retrieval heads: alpha >= quantile(alpha, sparsity)")
    ap.add_argument("--threshold", type=float, help="with --sparsity -1: alpha >= threshold")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--die-after", type=int, help=argparse.SUPPRESS)   # tests: SIGKILL after this checkpoint
    a = ap.parse_args(argv)
    cfg = load_config(a.config, steps=a.steps, lr=a.lr, dtype=a.dtype, ckpt_every=a.ckpt_every,
                      threshold=a.threshold)
    if a.sparsity is not None:
        cfg = dataclasses.replace(cfg, sparsity=None if a.sparsity < 0 else a.sparsity)
    summary, _ = run(cfg, a.out, progress=not a.no_progress, die_after=a.die_after)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
