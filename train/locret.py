"""Train Locret retaining heads on a frozen backbone (Huang et al., arXiv 2410.01805).

    python -m train.locret --config configs/locret_smollm2.json --steps 200 --out runs/locret

Labels (`locret/train/data_gen.py`): the frozen model runs over prompt + response with a full
cache; for every layer l, kv head h and prompt token j

    CIS[l, h, j] = max_{i in response} max_{g in group(h)} q_{l,g,i} . k_{l,h,j} / sqrt(d)

with post-RoPE q/k at their true positions, i.e. the PRE-softmax scaled logits. They are cached
to `<out>/labels.npz` (recomputed only if the data/model config changes).

Loss (`locret/train/train.py`), for head outputs s[l, h, t] over the prompt (full-context forward):
    L = mean_{l,h,t} SmoothL1_{beta=1}(s, CIS) + 0.0025 * sum_l mean (s[l,:,t] - s[l,:,t+1])^2
Metric: per-(layer, head) overlap of the predicted and label top-10% tokens ("acc").

Outputs under --out: ckpt/ (Orbax, resumable), metrics.jsonl, heads/ (meta.json + heads.npz,
the trained pieces alone, loadable with `kvjax.policies.locret.load_heads`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from kvjax.observation import Observe
from kvjax.policies.locret import HeadSpec, head_scores, init_heads, save_heads
from models.config import ModelConfig
from models.llama import forward, init_params
from models.rope import apply_rope
from train.data import DataConfig, make_dataset
from train.loop import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class LocretTrainConfig:
    """model: "smollm2", a GGUF/HF path, or "tiny" (random model for tests, `tiny` dict fields).
    hidden: head MLP width (None: d_model // 4). n_examples: training pairs (labels are cached).
    smooth: weight of the temporal-smoothness loss; beta: SmoothL1 beta."""

    model: str = "smollm2"
    tiny: tuple = ()
    hidden: int | None = None
    n_examples: int = 3000
    label_batch: int = 8
    smooth: float = 0.0025
    beta: float = 1.0
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


def load_config(path, **overrides) -> LocretTrainConfig:
    raw = json.loads(pathlib.Path(path).read_text())
    data = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.pop("data", {}).items()})
    tr = raw.pop("train", {})
    tr.update({k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}
               and v is not None})
    raw.update({k: v for k, v in overrides.items() if k in {"n_examples"} and v is not None})
    tiny = tuple(sorted(raw.pop("tiny", {}).items()))
    unknown = set(raw) - {f.name for f in dataclasses.fields(LocretTrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
    return LocretTrainConfig(**raw, tiny=tiny, data=data, train=TrainConfig(**tr))


def load_backbone(cfg: LocretTrainConfig) -> tuple[ModelConfig, dict]:
    if cfg.model == "tiny":
        t = dict(cfg.tiny)
        config = ModelConfig(name="tiny-locret", vocab_size=t.get("vocab_size", 256), d_model=t.get("d_model", 64),
                             n_layers=t.get("n_layers", 2), n_heads=t.get("n_heads", 4),
                             n_kv_heads=t.get("n_kv_heads", 2), head_dim=t.get("head_dim", 16),
                             ffn_dim=t.get("ffn_dim", 128), tie_embeddings=True)
        return config, init_params(config, jax.random.PRNGKey(t.get("seed", 0)), scale=t.get("scale", 0.1))
    from models.loading import load_model
    return load_model(cfg.model, progress=False)


# ----------------------------------------------------------------------------------------------
# Labels.

def rope_all(x: jax.Array, config: ModelConfig) -> jax.Array:
    """x [L, B, H, T, d] rotated at positions 0..T-1."""
    L, B, H, T, d = x.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (L * B, T))
    return apply_rope(x.reshape(L * B, H, T, d), pos, config).reshape(x.shape)


def cis_from_qk(q_pre: jax.Array, k_pre: jax.Array, prompt_len: int, response_mask: jax.Array,
                config: ModelConfig) -> jax.Array:
    """CIS labels [L, B, Hkv, P] from pre-RoPE q [L, B, Hq, P+R, d] and k [L, B, Hkv, P+R, d];
    response_mask [B, R] (False slots of the response are ignored)."""
    q, k = rope_all(q_pre.astype(jnp.float32), config), rope_all(k_pre.astype(jnp.float32), config)
    L, B, Hq, T, d = q.shape
    hkv = k.shape[2]
    qr = q[:, :, :, prompt_len:].reshape(L, B, hkv, Hq // hkv, T - prompt_len, d)
    kp = k[:, :, :, :prompt_len]

    def one_layer(args):
        ql, kl = args
        s = jnp.einsum("bhgrd,bhpd->bhgrp", ql, kl) * d ** -0.5
        s = jnp.where(response_mask[:, None, None, :, None], s, -jnp.inf)
        return s.max(axis=(2, 3))
    return jax.lax.map(one_layer, (qr, kp))


@functools.partial(jax.jit, static_argnames=("config", "prompt_len"))
def compute_labels(params, tokens, response_mask, *, config: ModelConfig, prompt_len: int):
    """tokens [B, P+R] (prompt then response) -> CIS [B, L, Hkv, P] float32 with the frozen model."""
    b, t = tokens.shape
    cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, _, obs = forward(params, tokens, pos, cache, config, Observe(qkv=True), False)
    cis = cis_from_qk(obs["q_pre"], obs["k_pre"], prompt_len, response_mask, config)
    return cis.transpose(1, 0, 2, 3)


def label_key(cfg: LocretTrainConfig, config: ModelConfig) -> str:
    blob = json.dumps([config.name, config.n_layers, dataclasses.asdict(cfg.data), cfg.n_examples, cfg.tiny],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_labels(cfg: LocretTrainConfig, config: ModelConfig, params, path=None, progress=True) -> dict:
    """The training set with its CIS labels, loaded from `path` if it was cached with the same config."""
    key = label_key(cfg, config)
    if path is not None and pathlib.Path(path).is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return {k: z[k] for k in z.files if k != "key"}
    data = make_dataset(cfg.data, "train", cfg.n_examples)
    P = cfg.data.prompt_len
    out = []
    it = range(0, cfg.n_examples, cfg.label_batch)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="labels", unit="batch")
    for s in it:
        e = min(s + cfg.label_batch, cfg.n_examples)
        toks = np.concatenate([data["prompt"][s:e], data["response"][s:e]], axis=1)
        out.append(np.asarray(compute_labels(params, jnp.asarray(toks), jnp.asarray(data["response_mask"][s:e]),
                                             config=config, prompt_len=P)))
    data["labels"] = np.concatenate(out).astype(np.float32)
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, key=np.asarray(key), **data)
    return data


# ----------------------------------------------------------------------------------------------
# Loss and metric.

def topk_overlap(pred: jax.Array, label: jax.Array, frac: float = 0.1) -> jax.Array:
    """Mean over all leading axes of |top-k(pred) ∩ top-k(label)| / k along the last axis, k = frac*T."""
    t = pred.shape[-1]
    k = max(1, int(t * frac))
    _, ip = jax.lax.top_k(pred, k)
    _, il = jax.lax.top_k(label, k)
    mp = jnp.zeros(pred.shape, jnp.float32)
    mp = jnp.put_along_axis(mp, ip, 1.0, axis=-1, inplace=False)
    hit = jnp.take_along_axis(mp, il, axis=-1)
    return hit.sum(-1).mean() / k


def smooth_l1(x: jax.Array, y: jax.Array, beta: float) -> jax.Array:
    d = jnp.abs(x - y)
    return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def make_loss(config: ModelConfig, cfg: LocretTrainConfig):
    dtype = cfg.train.compute_dtype

    def loss_fn(heads, frozen, batch):
        tokens, labels = batch["prompt"], batch["labels"]                   # [B, P], [B, L, Hkv, P]
        b, p = tokens.shape
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)
        cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, p, config.head_dim, dtype)
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        _, _, obs = forward(params, tokens, pos, cache, config, Observe(qkv=True), False)
        obs = jax.lax.stop_gradient(obs)
        s = head_scores(heads, obs["q_pre"], obs["k_pre"], obs["v"], dtype)      # [L, B, Hkv, P] f32
        y = labels.transpose(1, 0, 2, 3).astype(jnp.float32)
        reg = smooth_l1(s, y, cfg.beta).mean()
        smooth = jnp.mean((s[..., :-1] - s[..., 1:]) ** 2, axis=(1, 2, 3)).sum()
        loss = reg + cfg.smooth * smooth
        return loss, {"reg": reg, "smooth": smooth, "top10_overlap": topk_overlap(s, y)}
    return loss_fn


def batch_fn_for(data: dict, batch_size: int, seed: int):
    """Step -> batch; each epoch is a seeded permutation, so the stream is a function of the step."""
    n = len(data["prompt"])

    def fn(step):
        idx = []
        for j in range(step * batch_size, (step + 1) * batch_size):
            epoch, r = divmod(j, n)
            idx.append(np.random.default_rng([seed, epoch]).permutation(n)[r])
        idx = np.asarray(idx)
        return {"prompt": jnp.asarray(data["prompt"][idx]), "labels": jnp.asarray(data["labels"][idx])}
    return fn


def run(cfg: LocretTrainConfig, out, progress: bool = True, die_after=None, labels_path=None,
        export_dtype: str = "float32", mesh=None) -> tuple[dict, dict]:
    """Labels (cached), training (resumable), export. Returns (summary, trained heads).
    mesh: train data-parallel over its `data` axis with the backbone tensor-parallel over `model`."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config, params = load_backbone(cfg)
    spec = HeadSpec.for_model(config, cfg.hidden)
    data = build_labels(cfg, config, params, labels_path or out / "labels.npz", progress)
    t_labels = time.perf_counter() - t0
    heads = init_heads(spec, jax.random.PRNGKey(cfg.train.seed))
    heads, history = train(make_loss(config, cfg), heads, params, batch_fn_for(data, cfg.train.batch_size,
                                                                               cfg.train.seed),
                           cfg.train, ckpt_dir=out / "ckpt", progress=progress, die_after=die_after, mesh=mesh,
                           frozen_specs=None if mesh is None else _backbone_specs(params, config, mesh))
    save_heads(out / "heads", heads, spec, extra={"steps": cfg.train.steps, "train_config": json.loads(
        json.dumps(dataclasses.asdict(cfg), default=str))}, dtype=export_dtype)
    summary = {"model": config.name, "steps": cfg.train.steps, "labels_s": t_labels,
               "total_s": time.perf_counter() - t0, "final": history[-1] if history else None,
               "backend": jax.default_backend()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary, heads


def _backbone_specs(params, config, mesh):
    from kvjax.sharding import param_specs
    return param_specs(params, config, mesh)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.locret", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int, dest="batch_size")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup-steps", type=int, dest="warmup_steps")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--ckpt-every", type=int, dest="ckpt_every")
    ap.add_argument("--examples", type=int, dest="n_examples")
    ap.add_argument("--labels", help="label cache file (default <out>/labels.npz)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--export-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--mesh", default=None, help="train sharded, e.g. data=8 or data=2,model=4 (kvjax.sharding)")
    ap.add_argument("--die-after", type=int, help=argparse.SUPPRESS)   # tests: SIGKILL after this checkpoint
    a = ap.parse_args(argv)
    cfg = load_config(a.config, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                      dtype=a.dtype, ckpt_every=a.ckpt_every, n_examples=a.n_examples)
    if cfg.train.warmup_steps > cfg.train.steps:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=cfg.train.steps * 2 // 3))
    summary, _ = run(cfg, a.out, progress=not a.no_progress, die_after=a.die_after, labels_path=a.labels,
                  export_dtype=a.export_dtype, mesh=_mesh_arg(a.mesh))
    print(json.dumps(summary))


def _mesh_arg(spec):
    from kvjax.sharding import make_mesh
    return None if spec is None else make_mesh(spec)


if __name__ == "__main__":
    main()
