"""Fine-tune Gated Attention's output gates (models/gated_attention.py) of a frozen pretrained model on KJV.

    python -m train.gated_attention --model smollm2 --kind elementwise --seq-len 512 --steps 200 --out runs/gate

The model is converted (`models.gated_attention.convert`: gate weights 0, o_proj doubled: step 0
computes exactly the original function), then only the gate weights ([L, d_model, width] (+ bias))
are trained; every other weight is frozen. Loss: next-token cross-entropy (mean over the batch and
positions) on windows of seq_len + 1 tokens of the KJV "train" split (`train.data.corpus_tokens`,
window offsets a pure function of (seed, step), as train.nsa).

The loop is `train.loop.train` (AdamW + warmup/decay, clipping, Orbax checkpoints with resume, tqdm,
`<out>/metrics.jsonl`). Outputs under --out: ckpt/, metrics.jsonl, gates/ (Orbax: the gate weights
alone) + gates/../gate_meta.json (model, kind, shapes), summary.json. `load_gates(out, config)`
reloads them (clear errors for another model or kind); `convert(params, config, kind, gates)` builds
the gated model for `kvjax.generate` / `kvjax.eval`.

`attention_stats` measures what the paper claims the gate changes: the attention mass on the first
token (the sink) and the largest activation of the residual stream.
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
from kvjax.observation import Observe
from models.config import ModelConfig
from models.gated_attention import GATES, check_gates, convert, gate_shapes
from models.llama import forward, stacked_layer_params
from models.rope import apply_rope
from train.data import corpus_tokens
from train.loop import TrainConfig, train
from train.nsa import batch_fn_for

META_FILE = "gate_meta.json"
GATE_FORMAT = "kvjax-attention-gate"


@dataclasses.dataclass(frozen=True)
class GatedTrainConfig:
    """model: "smollm2", a GGUF/HF path, or "tiny" (random model, `tiny` fields, byte tokens)."""

    model: str = "smollm2"
    tiny: tuple = ()
    kind: str = "elementwise"
    seq_len: int = 512
    tokenizer: str = "smollm2"
    train: TrainConfig = TrainConfig(lr=3e-4, warmup_steps=20, steps=200, clip_value=1.0, ckpt_every=50,
                                     dtype="float32")

    def __post_init__(self):
        if self.kind not in GATES:
            raise ValueError(f"kind must be one of {GATES}, got {self.kind!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


def lm_logits(params, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """Full-sequence logits [B, T, vocab] (float32) over a fresh stacked dense cache."""
    b, t = tokens.shape
    cache = kvcache.init_cache(config.n_layers, b, config.n_kv_heads, t, config.head_dim, params["embed"].dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return forward(params, tokens, pos, cache, config, attention="xla")[0]


def with_gates(frozen, gates):
    """The gated params: the frozen (converted, stacked) backbone with the trainable gate weights."""
    return {**frozen, "layers": {**frozen["layers"], **gates}}


def make_loss(config: ModelConfig, cfg: GatedTrainConfig):
    """loss(gates, frozen, batch) = mean next-token cross-entropy of the gated model; config is gated."""
    dtype = cfg.train.compute_dtype

    def loss_fn(gates, frozen, batch):
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), with_gates(frozen, gates))
        logp = jax.nn.log_softmax(lm_logits(params, batch["tokens"], config), axis=-1)
        ce = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1).mean()
        return ce, {"ce": ce}
    return loss_fn


def attention_stats(params, config: ModelConfig, tokens: np.ndarray) -> dict:
    """Sink mass and largest activation of one sequence tokens [T] (full causal attention):
    sink_mass: attention probability on position 0, averaged over layers, query heads and the
    queries 1..T-1 (float32); per_layer_sink [L]; max_activation: max |x| of every layer's input
    hidden state (the residual stream); max_activation_per_layer [L]."""
    toks = jnp.asarray(tokens, jnp.int32)[None]
    t = toks.shape[1]
    cache = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, t, config.head_dim, params["embed"].dtype)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    _, _, outs = forward(params, toks, pos, cache, config, Observe(qkv=True, hidden=True), attention="xla")
    g = config.group_size
    sinks = []
    for layer in range(config.n_layers):
        q = apply_rope(outs["q_pre"][layer], pos, config).astype(jnp.float32)                # [1, Hq, T, d]
        k = jnp.repeat(apply_rope(outs["k_pre"][layer], pos, config).astype(jnp.float32), g, axis=1)
        s = jnp.einsum("bhtd,bhsd->bhts", q, k) * config.head_dim ** -0.5
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        p0 = jax.nn.softmax(s, axis=-1)[..., 1:, 0]                                          # queries 1..T-1
        sinks.append(float(p0.mean()))
    act = np.abs(np.asarray(outs["hidden"], np.float32)).reshape(config.n_layers, -1).max(-1)
    return {"sink_mass": float(np.mean(sinks)), "per_layer_sink": sinks, "max_activation": float(act.max()),
            "max_activation_per_layer": act.tolist()}


# ----------------------------------------------------------------------------------------------
# Export.

def save_gates(out, gates, config: ModelConfig, extra: dict | None = None) -> pathlib.Path:
    """gates/ (Orbax, the gate weights stacked over layers) and gate_meta.json under `out`."""
    import orbax.checkpoint as ocp
    check_gates(gates, config)
    out = pathlib.Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "gates", {k: np.asarray(v, np.float32) for k, v in gates.items()}, force=True)
    meta = {"format": GATE_FORMAT, "model": config.name, "kind": config.attn_gate, "n_layers": config.n_layers,
            "shapes": {k: list(v) for k, v in gate_shapes(config).items()}, **(extra or {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def load_gates(path, config: ModelConfig) -> tuple[str, dict]:
    """(kind, gate weights) saved by `save_gates` for the (ungated) model `config`; FileNotFoundError /
    ValueError when the directory is not a gate export or belongs to another model."""
    import orbax.checkpoint as ocp
    d = pathlib.Path(path).absolute()
    if not (d / META_FILE).is_file() or not (d / "gates").is_dir():
        raise FileNotFoundError(f"{d} is not a Gated Attention export: expected {META_FILE} and gates/ "
                                f"(train with `python -m train.gated_attention --out DIR`)")
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != GATE_FORMAT:
        raise ValueError(f"{d / META_FILE}: not a Gated Attention export (format {meta.get('format')!r})")
    if meta["model"] != config.name:
        raise ValueError(f"the gates in {d} were trained for model {meta['model']!r}, not {config.name!r}")
    gated = dataclasses.replace(config, attn_gate=meta["kind"])
    with ocp.StandardCheckpointer() as ckptr:
        gates = {k: jnp.asarray(v) for k, v in ckptr.restore(d / "gates").items()}
    check_gates(gates, gated)
    return meta["kind"], gates


# ----------------------------------------------------------------------------------------------
# Run.

def run(cfg: GatedTrainConfig, out, progress: bool = True, die_after=None):
    """Train (resumable) and export. Returns (summary dict, trained gates)."""
    from train.locret import load_backbone
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config, params = load_backbone(cfg)
    params = {**jax.tree_util.tree_map(jnp.asarray, params), "layers": stacked_layer_params(params)}
    gated, gparams = convert(params, config, cfg.kind)
    gates = {n: gparams["layers"].pop(n).astype(jnp.float32) for n in gate_shapes(gated)}
    corpus = corpus_tokens("bytes" if cfg.model == "tiny" else cfg.tokenizer, "train", 0.9)
    batch_fn = batch_fn_for(corpus, cfg.seq_len, cfg.train.batch_size, cfg.train.seed)
    gates, history = train(make_loss(gated, cfg), gates, gparams, batch_fn, cfg.train, ckpt_dir=out / "ckpt",
                           progress=progress, die_after=die_after)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.seq_len
    save_gates(out, gates, gated, {"steps": cfg.train.steps, "tokens": tokens, "seq_len": cfg.seq_len})
    summary = {"model": config.name, "kind": cfg.kind, "steps": cfg.train.steps, "tokens": tokens,
               "total_s": time.perf_counter() - t0, "first": history[0] if history else None,
               "final": history[-1] if history else None, "backend": jax.default_backend()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary, gates


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.gated_attention", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help='"smollm2", a GGUF/HF path, or "tiny"')
    ap.add_argument("--kind", choices=GATES, default="elementwise")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--die-after", type=int, help=argparse.SUPPRESS)   # tests: SIGKILL after this checkpoint
    a = ap.parse_args(argv)
    tr = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=min(a.warmup_steps, a.steps),
                     dtype=a.dtype, ckpt_every=a.ckpt_every, log_every=a.log_every, clip_value=1.0)
    cfg = GatedTrainConfig(model=a.model, kind=a.kind, seq_len=a.seq_len, train=tr)
    summary, _ = run(cfg, a.out, progress=not a.no_progress, die_after=a.die_after)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
