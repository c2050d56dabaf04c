"""Continued training of a Llama-family model with NSA attention (models/nsa.py) on KJV text.

    python -m train.nsa --model smollm2 --seq-len 2048 --steps 500 --out runs/nsa

The student is the pretrained model with NSA attention in every layer (q/k/v/o from the
checkpoint; compressor and gates new, see `models.nsa.init_nsa_layer`); the teacher is the same
pretrained model with dense attention. Loss per token (mean over the batch and positions):

    L = lm_weight * CE(student logits, next token) + kl_weight * KL(teacher || student)

`--trainable nsa` trains only the NSA parameters (compressor, position embedding, gates);
`--trainable all` (default) the whole student (the teacher stays the frozen dense model).
Data: windows of seq_len + 1 tokens of the KJV "train" split (`train.data.corpus_tokens`; the
last 10% of the verses are held out), window offsets a pure function of (seed, step).

The loop is `train.loop.train` (AdamW + warmup/decay, clipping, Orbax checkpoints with resume,
tqdm bar, `<out>/metrics.jsonl`). Outputs under --out: ckpt/, metrics.jsonl, nsa/ (the export,
`models.nsa_weights.load_nsa`), summary.json.

`--attention xla` (default) differentiates the pure-jnp NSA path (masks are [T, T]: short
contexts only). `--attention pallas` runs the selected-block and the sliding-window branches
through the Pallas kernels with their own backward (`pallas_kernels.{gpu,tpu}.nsa_select_bwd`,
picked by the default backend; the window as `models.nsa.window_blocks` + the kernels' window
bound; `interpret` runs the GPU kernels in interpret mode, for CPU tests); the compression branch
([T, T/d] scores) stays jnp in every mode.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as kvcache
from models.config import ModelConfig
from models.llama import forward, init_params
from models.nsa import NSAConfig, init_nsa_params, nsa_forward
from models.nsa_weights import save_nsa
from train.data import corpus_tokens
from train.loop import TrainConfig, train

TRAINABLE = ("nsa", "all")
ATTENTION = ("xla", "pallas", "interpret")


def select_fn_for(attention: str, block_q: int = 64):
    """The `select_fn` of `models.nsa.nsa_attention` for a training backend: None (jnp reference)
    for "xla", else the differentiable Pallas selection op (TPU kernels on a TPU backend, the
    Triton ones otherwise; "interpret" = Triton kernels in interpret mode)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "xla":
        return None
    if attention == "pallas" and jax.default_backend() == "tpu":
        from pallas_kernels.tpu.nsa_select_bwd import nsa_select_trainable
    else:
        from pallas_kernels.gpu.nsa_select_bwd import nsa_select_trainable
    interpret = attention == "interpret"

    def select(q, k, v, indices, counts, block_size, scale, window=0):
        return nsa_select_trainable(q, k, v, indices, counts, block_size, scale, block_q, interpret, window)
    return select


@dataclasses.dataclass(frozen=True)
class NSATrainConfig:
    """model: "smollm2", a GGUF/HF path, or "tiny" (random model, `tiny` fields, byte tokens)."""

    model: str = "smollm2"
    tiny: tuple = ()
    nsa: NSAConfig = NSAConfig()
    seq_len: int = 2048
    lm_weight: float = 1.0
    kl_weight: float = 1.0
    trainable: str = "all"
    remat: bool = True
    tokenizer: str = "smollm2"
    attention: str = "xla"
    train: TrainConfig = TrainConfig(lr=5e-5, warmup_steps=50, steps=500, clip_value=1.0, ckpt_every=100)

    def __post_init__(self):
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.lm_weight < 0 or self.kl_weight < 0 or self.lm_weight + self.kl_weight == 0:
            raise ValueError("lm_weight and kl_weight must be >= 0 and not both 0")


def load_backbone(cfg: NSATrainConfig) -> tuple[ModelConfig, dict]:
    if cfg.model == "tiny":
        t = dict(cfg.tiny)
        config = ModelConfig(name="tiny-nsa", vocab_size=256, d_model=t.get("d_model", 64),
                             n_layers=t.get("n_layers", 2), n_heads=t.get("n_heads", 6),
                             n_kv_heads=t.get("n_kv_heads", 2), head_dim=t.get("head_dim", 16),
                             ffn_dim=t.get("ffn_dim", 128), tie_embeddings=True)
        return config, init_params(config, jax.random.PRNGKey(t.get("seed", 0)), scale=t.get("scale", 0.1))
    from models.loading import load_model
    return load_model(cfg.model, progress=False)


def batch_fn_for(corpus: np.ndarray, seq_len: int, batch_size: int, seed: int):
    """step -> {"tokens": [B, seq_len], "targets": [B, seq_len]} from random windows of `corpus`."""
    if len(corpus) < seq_len + 2:
        raise ValueError(f"the corpus has {len(corpus)} tokens, fewer than seq_len + 1 = {seq_len + 1}")

    def fn(step):
        starts = np.random.default_rng([seed, step]).integers(0, len(corpus) - seq_len - 1, batch_size)
        win = np.stack([corpus[s:s + seq_len + 1] for s in starts])
        return {"tokens": jnp.asarray(win[:, :-1]), "targets": jnp.asarray(win[:, 1:])}
    return fn


def dense_logits(params, tokens, config: ModelConfig):
    b, t = tokens.shape
    cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim,
                               params["embed"].dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return forward(params, tokens, pos, cache, config)[0]


def make_loss(config: ModelConfig, cfg: NSATrainConfig):
    dtype = cfg.train.compute_dtype
    select_fn = select_fn_for(cfg.attention)

    def loss_fn(trainable, frozen, batch):
        tokens, targets = batch["tokens"], batch["targets"]
        cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)
        teacher = cast(frozen["teacher"])
        student = cast(trainable["backbone"]) if "backbone" in trainable else teacher
        logits = nsa_forward(student, cast(trainable["nsa"]), tokens, config, cfg.nsa, select_fn=select_fn,
                             remat=cfg.remat)
        t_logits = jax.lax.stop_gradient(dense_logits(teacher, tokens, config))
        logp = jax.nn.log_softmax(logits, axis=-1)
        t_logp = jax.nn.log_softmax(t_logits, axis=-1)
        ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
        t_ce = -jnp.take_along_axis(t_logp, targets[..., None], axis=-1).mean()
        kl = (jnp.exp(t_logp) * (t_logp - logp)).sum(-1).mean()
        loss = cfg.lm_weight * ce + cfg.kl_weight * kl
        return loss, {"ce": ce, "kl": kl, "teacher_ce": t_ce}
    return loss_fn


def initial_trainable(cfg: NSATrainConfig, config: ModelConfig, params) -> dict:
    nsa = {str(i): lp for i, lp in init_nsa_params(config, cfg.nsa, jax.random.PRNGKey(cfg.train.seed)).items()}
    out = {"nsa": nsa}
    if cfg.trainable == "all":
        out["backbone"] = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return out


def run(cfg: NSATrainConfig, out, progress: bool = True, die_after=None, export_dtype: str = "float32"):
    """Train (resumable) and export. Returns (summary dict, trained pytree)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config, params = load_backbone(cfg)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok = "bytes" if cfg.model == "tiny" else cfg.tokenizer
    corpus = corpus_tokens(tok, "train", 0.9)
    batch_fn = batch_fn_for(corpus, cfg.seq_len, cfg.train.batch_size, cfg.train.seed)
    trained, history = train(make_loss(config, cfg), initial_trainable(cfg, config, params), {"teacher": params},
                             batch_fn, cfg.train, ckpt_dir=out / "ckpt", progress=progress, die_after=die_after)
    steps_tokens = cfg.train.steps * cfg.train.batch_size * cfg.seq_len
    save_nsa(out / "nsa", {int(i): lp for i, lp in trained["nsa"].items()}, cfg.nsa, config,
             backbone=trained.get("backbone"), dtype=export_dtype,
             extra={"steps": cfg.train.steps, "tokens": steps_tokens, "seq_len": cfg.seq_len})
    summary = {"model": config.name, "steps": cfg.train.steps, "tokens": steps_tokens,
               "total_s": time.perf_counter() - t0, "first": history[0] if history else None,
               "final": history[-1] if history else None, "backend": jax.default_backend()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary, trained


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.nsa", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help='"smollm2", a GGUF/HF path, or "tiny"')
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--trainable", choices=TRAINABLE, default="all")
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--attention", choices=ATTENTION, default="xla",
                    help="selected-block branch: jnp reference (xla) or the Pallas kernels with their backward")
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--export-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--die-after", type=int, help=argparse.SUPPRESS)   # tests: SIGKILL after this checkpoint
    a = ap.parse_args(argv)
    tr = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=min(a.warmup_steps, a.steps),
                     dtype=a.dtype, ckpt_every=a.ckpt_every, log_every=a.log_every, clip_value=1.0)
    cfg = NSATrainConfig(model=a.model, nsa=NSAConfig(window=a.window, top_n=a.top_n), seq_len=a.seq_len,
                         lm_weight=a.lm_weight, kl_weight=a.kl_weight, trainable=a.trainable, attention=a.attention,
                         remat=not a.no_remat, train=tr)
    summary, _ = run(cfg, a.out, progress=not a.no_progress, die_after=a.die_after, export_dtype=a.export_dtype)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
