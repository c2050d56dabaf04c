"""Train LoCoCo's convolutional compressor (kvjax/policies/lococo.py) on a frozen model.

    python -m train.lococo --config configs/lococo_smollm2_cpu.json --out runs/lococo

Spec §10.1 (official `train.py`): a window of `n_chunks` x `chunk` tokens is fed chunk by chunk;
after each chunk the cache is fused back to `mem_size` slots per (layer, kv head) by the compressor
(exactly the deployed `kvjax.policies.base.compress` with the `LoCoCo` policy); the next chunk
attends to that memory and to itself. Loss: next-token CE over the chunks that see a fused memory
(chunk 1 on). Truncated gradient as in the official code: the cache entering a compression and its
heavy-hitter scores are detached, so the conv and lam get gradients only through the next chunk's
attention to the memory they produced. The loop is `train.loop.train` (AdamW, warmup / decay,
clipping, Orbax checkpoints with resume, tqdm progress, metrics.jsonl). Outputs under --out: ckpt/,
metrics.jsonl, compressor/ (`save_compressor`, float16 unless --export-dtype float32; deploy with
`--policy lococo:weights=<out>/compressor --budget <mem_size> --when chunk --chunk-size <chunk>`),
summary.json.
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

from kvjax import cache as kvcache
from kvjax.observation import Observer
from kvjax.policies.attention_gate import _Frozen
from kvjax.policies.base import compress
from kvjax.policies.lococo import CompressorSpec, LoCoCo, init_compressor, save_compressor
from models.config import ModelConfig
from models.llama import forward, stacked_layer_params
from train.data import corpus_tokens
from train.loop import TrainConfig, train
from train.nsa import batch_fn_for


@dataclasses.dataclass(frozen=True)
class LoCoCoTrainConfig:
    """chunk x n_chunks tokens per window; mem_size / hh_keep_rate / kernel / act: the compressor
    (official 512 / 0.5 / 21 / relu at 512-token chunks); init_std: conv init (None: 1/sqrt(2d k));
    lam_init: the normalizer's start (official 0.5)."""

    model: str = "smollm2"
    tiny: tuple = ()
    chunk: int = 128
    n_chunks: int = 4
    mem_size: int = 64
    hh_keep_rate: float = 0.5
    kernel: int = 21
    act: str = "relu"
    init_std: Optional[float] = None
    lam_init: float = 0.5
    tokenizer: str = "smollm2"
    export_dtype: str = "float16"
    train: TrainConfig = TrainConfig(lr=1e-2, warmup_steps=5, steps=40, clip_value=1.0, ckpt_every=10,
                                     dtype="float32", weight_decay=0.0)

    def __post_init__(self):
        if self.n_chunks < 2:
            raise ValueError(f"n_chunks must be >= 2 (the first chunk has no memory to learn from), got {self.n_chunks}")
        if self.chunk <= 0:
            raise ValueError(f"chunk must be positive, got {self.chunk}")
        if self.export_dtype not in ("float32", "float16"):
            raise ValueError(f"export_dtype must be float32 or float16, got {self.export_dtype!r}")

    @property
    def seq_len(self) -> int:
        return self.chunk * self.n_chunks

    def spec(self, config: ModelConfig) -> CompressorSpec:
        return CompressorSpec.for_model(config, mem_size=self.mem_size, hh_keep_rate=self.hh_keep_rate,
                                        kernel=self.kernel, act=self.act)


def make_loss(config: ModelConfig, cfg: LoCoCoTrainConfig, dtype=None):
    """loss_fn(compressor, frozen params (stacked layers), batch) -> (loss, metrics); `dtype`
    overrides the compute dtype of the frozen weights and the cache."""
    dtype = cfg.train.compute_dtype if dtype is None else dtype
    spec = cfg.spec(config)
    scorer = Observer(LoCoCo(mem_size=spec.mem_size, keep=spec.keep, act=spec.act))
    c, k = cfg.chunk, spec.mem_size

    def loss_fn(w, frozen, batch):
        tokens, targets = batch["tokens"], batch["targets"]
        b = tokens.shape[0]
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)
        policy = LoCoCo.from_weights(w, spec)
        cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, k + c, config.head_dim, dtype)
        ces = []
        for i in range(cfg.n_chunks):
            pos = jnp.broadcast_to(jnp.arange(i * c, (i + 1) * c, dtype=jnp.int32), (b, c))
            logits, cache, outs = forward(params, tokens[:, i * c:(i + 1) * c], pos, cache, config,
                                          observer=scorer, attention="xla")
            if i:
                logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                ces.append(-jnp.take_along_axis(logp, targets[:, i * c:(i + 1) * c, None], -1).mean())
            if i + 1 < cfg.n_chunks:
                cache, _ = compress(policy, config, jax.lax.stop_gradient(cache),
                                    jax.lax.stop_gradient(outs["scores"]), jnp.full((b,), k, jnp.int32), k + c, k)
        ce = jnp.mean(jnp.stack(ces))
        return ce, {"lam": jnp.mean(w["lam"])}
    return loss_fn


def load_backbone(cfg: LoCoCoTrainConfig):
    """(config, params with stacked layers) of cfg.model ("tiny": a random tiny Llama)."""
    from train.locret import load_backbone as load
    config, params = load(cfg)
    return config, {**jax.tree_util.tree_map(jnp.asarray, params), "layers": stacked_layer_params(params)}


def run(cfg: LoCoCoTrainConfig, out, progress: bool = True, die_after=None):
    """Train (resumable) and export compressor/. Returns (summary, weights)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config, params = load_backbone(cfg)
    spec = cfg.spec(config)
    corpus = corpus_tokens("bytes" if cfg.model == "tiny" else cfg.tokenizer, "train", 0.9)
    batch_fn = batch_fn_for(corpus, cfg.seq_len, cfg.train.batch_size, cfg.train.seed)
    init = init_compressor(spec, jax.random.PRNGKey(cfg.train.seed), cfg.init_std, cfg.lam_init)
    w, history = train(make_loss(config, cfg), init, params, batch_fn, cfg.train, ckpt_dir=out / "ckpt",
                       progress=progress, die_after=die_after)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.seq_len
    save_compressor(out / "compressor", w, spec, {"steps": cfg.train.steps, "tokens": tokens, "chunk": cfg.chunk},
                    dtype=cfg.export_dtype)
    summary = {"model": config.name, "steps": cfg.train.steps, "tokens": tokens, "total_s": time.perf_counter() - t0,
               "first": history[0] if history else None, "final": history[-1] if history else None,
               "lam": [round(float(x), 4) for x in w["lam"]], "backend": jax.default_backend()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary, w


def load_config(path, **overrides) -> LoCoCoTrainConfig:
    """A JSON config (`configs/lococo_smollm2_cpu.json`): top-level LoCoCoTrainConfig fields, "tiny"
    (model dims), "train" (TrainConfig fields); non-None `overrides` of TrainConfig fields win."""
    raw = json.loads(pathlib.Path(path).read_text())
    tr = {**dataclasses.asdict(LoCoCoTrainConfig.train), **raw.pop("train", {})}
    tr.update({k: v for k, v in overrides.items() if v is not None})
    tiny = tuple(sorted(raw.pop("tiny", {}).items()))
    unknown = set(raw) - {f.name for f in dataclasses.fields(LoCoCoTrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
    return LoCoCoTrainConfig(**raw, tiny=tiny, train=TrainConfig(**tr))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.lococo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--ckpt-every", type=int, dest="ckpt_every")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--die-after", type=int, help=argparse.SUPPRESS)   # tests: SIGKILL after this checkpoint
    a = ap.parse_args(argv)
    cfg = load_config(a.config, steps=a.steps, lr=a.lr, ckpt_every=a.ckpt_every)
    summary, _ = run(cfg, a.out, progress=not a.no_progress, die_after=a.die_after)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
