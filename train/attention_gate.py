"""Train Attention-Gates (kvjax/policies/attention_gate.py) on a frozen model: in-context eviction.

    python -m train.attention_gate --model smollm2 --seq-len 384 --steps 60 --budget 0.25 --out runs/ag

Every layer's attention runs with the gate's flags (`GateMix`, through `models.llama.forward(...,
attn_mod=)`): key s is visible to query t if s <= t and (f_s = 1 or t - s < local or s < sink);
f = 1[p >= 0.5] with a straight-through estimator (the forward uses f, the backward d p). Loss (spec §3):

    L = CE(next token) + lam * (evicted fraction - target)^2,   evicted fraction = mean(1 - f_STE)

over the valid tokens of every layer and kv head. Train for the rate the gates are deployed at:
`--budget 0.25` sets target = 0.75 (a gate trained to evict 50% ranks tokens for a different cut).
`sink` (first tokens always visible, and protected when deployed) is our addition, not the spec's. Data: KJV windows as train.nsa. The loop is
`train.loop.train` (AdamW, warmup/decay, clipping, Orbax checkpoints with resume, metrics.jsonl).
Outputs under --out: ckpt/, metrics.jsonl, gates/ (`kvjax.policies.attention_gate.save_gates`; use
with `--policy attention_gate:gates=<out>/gates`), summary.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.policies.attention_gate import GateSpec, init_gates, keep_logits, save_gates
from models.config import ModelConfig
from models.llama import forward, rms_norm, stacked_layer_params
from train.data import corpus_tokens
from train.loop import TrainConfig, train
from train.nsa import batch_fn_for


@dataclasses.dataclass(frozen=True)
class GateTrainConfig:
    """target: evicted fraction aimed at (1 - the deployed budget ratio); lam: weight of the eviction
    loss; local: always-visible recent keys; sink: always-visible first tokens (0: none);
    heads / head_dim: the gate's attention; threshold: tau of the flag; init_bias: the initial keep
    logit (0: p = 0.5, at the threshold, so the CE gradient ranks tokens from the first step)."""

    model: str = "smollm2"
    tiny: tuple = ()
    seq_len: int = 512
    target: float = 0.75
    lam: float = 10.0
    local: int = 8
    sink: int = 4
    heads: int = 2
    head_dim: int = 8
    threshold: float = 0.5
    init_bias: float = 0.0
    tokenizer: str = "smollm2"
    train: TrainConfig = TrainConfig(lr=3e-3, warmup_steps=20, steps=200, clip_value=1.0, ckpt_every=50,
                                     dtype="float32")

    def __post_init__(self):
        if not 0 <= self.target < 1:
            raise ValueError(f"target eviction rate must be in [0, 1), got {self.target}")
        if self.local < 1:
            raise ValueError(f"local must be >= 1 (a token always sees itself), got {self.local}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")


def ste_flags(p: jax.Array, threshold: float) -> jax.Array:
    """1[p >= threshold] in the forward, gradient of p in the backward."""
    return (p >= threshold).astype(p.dtype) + p - jax.lax.stop_gradient(p)


def kept_attention(q, keys, values, slot_pos, query_pos, keep, local: int, sink: int = 0) -> jax.Array:
    """Causal grouped attention where slot s is seen by query t only if keep[s] (0/1, may carry an STE
    gradient), t - s < local or s < sink. q [B, Hq, T, d]; keys/values [B, Hkv, S, d]; slot_pos
    [B, Hkv, S]; query_pos [B, T]; keep [B, Hkv, S] -> [B, Hq, T, d] float32. Masked logits are -inf
    before the exp (0 * exp(large future logit) was inf * 0 = NaN)."""
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, t, d).astype(jnp.float32)
    logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, keys.astype(jnp.float32)) * d ** -0.5
    sp, qp = slot_pos[:, :, None, :], query_pos[:, None, :, None]
    causal = (sp >= 0) & (sp <= qp)                                                   # [B, Hkv, T, S]
    w = jnp.where((qp - sp < local) | (sp < sink), 1.0, keep[:, :, None, :])[:, :, None]     # [B, Hkv, 1, T, S]
    masked = jnp.where(causal[:, :, None], logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(masked, -1, keepdims=True))
    e = w * jnp.exp(masked - jnp.where(jnp.isfinite(m), m, 0.0))              # a padding query sees nothing: 0
    den = jnp.maximum(e.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    return jnp.einsum("bhgts,bhsd->bhgtd", e / den, values.astype(jnp.float32)).reshape(b, hq, t, d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GateMix:
    """`forward(..., attn_mod=GateMix(gates [L, ...]))`: attention with the gate's eviction flags.
    Needs a fresh dense KVCache holding exactly this forward's tokens (training)."""

    gates: dict
    heads: int = dataclasses.field(metadata=dict(static=True), default=2)
    local: int = dataclasses.field(metadata=dict(static=True), default=8)
    sink: int = dataclasses.field(metadata=dict(static=True), default=4)
    threshold: float = dataclasses.field(metadata=dict(static=True), default=0.5)

    def attention(self, h, q, positions, cache, out):
        if not isinstance(cache, kvcache.KVCache) or cache.keys.shape[2] != q.shape[2]:
            raise ValueError("GateMix needs a dense KVCache holding exactly the forward's tokens")
        p = jax.nn.sigmoid(keep_logits(self.gates, h, positions >= 0, self.heads))        # [B, Hkv, T]
        keep = ste_flags(p, self.threshold)
        return kept_attention(q, cache.keys, cache.values, cache.positions, positions, keep,
                              self.local, self.sink).astype(out.dtype)


def make_loss(config: ModelConfig, cfg: GateTrainConfig):
    dtype = cfg.train.compute_dtype

    def loss_fn(gates, frozen, batch):
        tokens, targets = batch["tokens"], batch["targets"]
        b, t = tokens.shape
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)
        cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim, dtype)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mod = GateMix(gates, cfg.heads, cfg.local, cfg.sink, cfg.threshold)
        logits, _, outs = forward(params, tokens, pos, cache, config, Observe(hidden=True), attn_mod=mod,
                                  attention="xla")
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
        h = jax.vmap(lambda x, w: rms_norm(x, w, config.norm_eps))(outs["hidden"], params["layers"]["attn_norm"])
        z = jax.vmap(lambda g, x: keep_logits(g, x, pos >= 0, cfg.heads))(gates, h)    # [L, B, Hkv, T]
        p = jax.nn.sigmoid(z)
        evicted = 1.0 - ste_flags(p, cfg.threshold).mean()
        loss = ce + cfg.lam * (evicted - cfg.target) ** 2
        # logit_spread: how much the gate separates tokens (std over tokens, mean over layer and head)
        return loss, {"ce": ce, "evicted": evicted, "p_mean": p.mean(), "logit_spread": z.std(-1).mean()}
    return loss_fn


def run(cfg: GateTrainConfig, out, progress: bool = True, die_after=None, export_dtype=jnp.float32):
    """Train (resumable) and export gates/ (weights in `export_dtype`). Returns (summary, gates)."""
    from train.locret import load_backbone
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config, params = load_backbone(cfg)
    params = {**jax.tree_util.tree_map(jnp.asarray, params), "layers": stacked_layer_params(params)}
    spec = GateSpec.for_model(config, cfg.heads, cfg.head_dim)
    corpus = corpus_tokens("bytes" if cfg.model == "tiny" else cfg.tokenizer, "train", 0.9)
    batch_fn = batch_fn_for(corpus, cfg.seq_len, cfg.train.batch_size, cfg.train.seed)
    gates, history = train(make_loss(config, cfg), init_gates(spec, jax.random.PRNGKey(cfg.train.seed), bias=cfg.init_bias), params,
                           batch_fn, cfg.train, ckpt_dir=out / "ckpt", progress=progress, die_after=die_after)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.seq_len
    save_gates(out / "gates", gates, spec, {"steps": cfg.train.steps, "tokens": tokens, "target": cfg.target,
                                            "local": cfg.local, "sink": cfg.sink}, dtype=export_dtype)
    summary = {"model": config.name, "steps": cfg.train.steps, "tokens": tokens, "total_s": time.perf_counter() - t0,
               "first": history[0] if history else None, "final": history[-1] if history else None,
               "backend": jax.default_backend()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary, gates


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.attention_gate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help='"smollm2", a GGUF/HF path, or "tiny"')
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--budget", type=float, default=0.25, help="deployed kept ratio: target = 1 - budget")
    ap.add_argument("--target", type=float, help="evicted fraction aimed at (overrides --budget)")
    ap.add_argument("--lam", type=float, default=10.0)
    ap.add_argument("--local", type=int, default=8)
    ap.add_argument("--sink", type=int, default=4, help="first tokens always kept (our addition; 0: off)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init-bias", type=float, default=0.0)
    ap.add_argument("--fp16", action="store_true", help="export the gates in float16")
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--die-after", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    tr = TrainConfig(steps=a.steps, lr=a.lr, warmup_steps=min(a.warmup_steps, a.steps), dtype=a.dtype,
                     ckpt_every=a.ckpt_every, log_every=a.log_every, clip_value=1.0)
    if not 0 < a.budget <= 1:
        ap.error(f"--budget must be a kept ratio in (0, 1], got {a.budget}")
    cfg = GateTrainConfig(model=a.model, seq_len=a.seq_len, target=1 - a.budget if a.target is None else a.target,
                          lam=a.lam, local=a.local, sink=a.sink, heads=a.heads, head_dim=a.head_dim,
                          init_bias=a.init_bias, train=tr)
    summary, _ = run(cfg, a.out, progress=not a.no_progress, die_after=a.die_after,
                     export_dtype=jnp.float16 if a.fp16 else jnp.float32)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
