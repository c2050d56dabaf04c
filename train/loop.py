"""The shared training loop for the learned pieces (Locret heads, and later DuoAttention gates, ...).

The backbone is frozen: its parameters and the trainable parameters are separate pytrees, and
only the trainable one is differentiated, updated, checkpointed and exported.

    history = train(loss_fn, trainable, frozen, batch_fn, TrainConfig(...), ckpt_dir="runs/x/ckpt")

- `loss_fn(trainable, frozen, batch) -> (loss, metrics)` (pure; `metrics` a dict of scalars).
- `batch_fn(step) -> batch` must be a pure function of the step, so a resumed run sees the
  same data as an uninterrupted one.
- Optimizer: clip by value (per gradient element; `clip_value=0` turns it off), then AdamW with
  linear warmup and linear decay to 0 at `steps` (HF `get_linear_schedule_with_warmup`, which
  Locret uses), or `lr_schedule="duo"`: DuoAttention's warmup / flat / decay (see `schedule`).
- `project(trainable) -> trainable`, optional: applied after every update (e.g. a clamp).
- Checkpoints: `orbax.checkpoint.CheckpointManager` saves {trainable, opt_state, step} every
  `ckpt_every` steps (and at the end), keeps the last `keep`, and `train` restores the latest one.
- Metrics go to a tqdm bar and, one JSON line per logged step, to `<ckpt_dir>/../metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("linear", "duo")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Defaults are Locret's (`locret/train/train.py`): AdamW lr 5e-4, betas (0.9, 0.95), torch's
    default weight decay 0.01, 2000 warmup steps of 3000, clip_grad_value 0.5, bf16, seed 0."""

    steps: int = 3000
    batch_size: int = 1
    lr: float = 5e-4
    warmup_steps: int = 2000
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.01
    clip_value: float = 0.5
    dtype: str = "bfloat16"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep: int = 3
    lr_schedule: str = "linear"

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.ckpt_every <= 0 or self.keep <= 0 or self.log_every <= 0:
            raise ValueError("ckpt_every, keep and log_every must be positive")
        if self.clip_value < 0:
            raise ValueError(f"clip_value must be >= 0 (0: no clipping), got {self.clip_value}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """"linear": warmup 0 -> lr over `warmup_steps` (capped at steps), then linear decay to 0 at
    `steps`. "duo" (DuoAttention `train.py`, N = steps, s = step, `warmup_steps` unused):
    lr * min(1, max((s + 1) / (N / 5), 0.1), max((N - s) / (N / 5), 0.1))."""
    if cfg.lr_schedule == "duo":
        fifth = cfg.steps / 5

        def duo(count):
            c = jnp.asarray(count, jnp.float32)
            up = jnp.maximum((c + 1) / fifth, 0.1)
            down = jnp.maximum((cfg.steps - c) / fifth, 0.1)
            return cfg.lr * jnp.minimum(jnp.minimum(1.0, up), down)
        return duo
    warm = min(cfg.warmup_steps, cfg.steps)

    def fn(count):
        c = jnp.asarray(count, jnp.float32)
        up = cfg.lr * c / max(warm, 1)
        down = cfg.lr * jnp.maximum(0.0, (cfg.steps - c) / max(cfg.steps - warm, 1))
        return jnp.where(c < warm, up, down)
    return fn


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip(cfg.clip_value), adamw) if cfg.clip_value > 0 else adamw


def make_step(loss_fn: Callable, opt: optax.GradientTransformation, project: Optional[Callable] = None):
    """Jitted `(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss, metrics)`;
    `project` (if given) maps the updated trainable pytree (e.g. a clamp to its domain)."""
    @jax.jit
    def step(trainable, opt_state, frozen, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return (trainable if project is None else project(trainable)), opt_state, loss, metrics
    return step


def _manager(ckpt_dir, cfg: TrainConfig):
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(pathlib.Path(ckpt_dir).absolute(),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True))


def train(loss_fn: Callable, trainable: Any, frozen: Any, batch_fn: Callable[[int], Any], cfg: TrainConfig,
          ckpt_dir=None, progress: bool = True, die_after: Optional[int] = None, mesh=None,
          frozen_specs=None, project: Optional[Callable] = None) -> tuple[Any, list[dict]]:
    """Train `trainable` for `cfg.steps` steps (resuming from the latest checkpoint in `ckpt_dir`).

    mesh: a ("data", "model") `jax.sharding.Mesh` (kvjax.sharding.make_mesh): data-parallel over
    `data` (every batch array split on its leading axis; jit all-reduces the gradients), the
    trainable parameters and optimizer state replicated, the frozen backbone placed per
    `frozen_specs` (e.g. `kvjax.sharding.param_specs(params, config, mesh)`: tensor-parallel over
    `model`; None: replicated). Checkpoints restore onto the current mesh, whatever mesh wrote them.

    die_after: testing aid; after the checkpoint of that step is written the process kills itself
    with SIGKILL (what a preempted job looks like). project: see `make_step`. Returns (trainable, history of logged dicts)."""
    import orbax.checkpoint as ocp
    opt = make_optimizer(cfg)
    if mesh is not None:
        from kvjax import sharding
        trainable = sharding.replicate(trainable, mesh)
        frozen = (sharding.replicate(frozen, mesh) if frozen_specs is None
                  else sharding.place(frozen, frozen_specs, mesh))
        batch_fn = (lambda fn: lambda s: sharding.shard_batch(fn(s), mesh))(batch_fn)
    opt_state = opt.init(trainable)
    start = 0
    mngr = _manager(ckpt_dir, cfg) if ckpt_dir is not None else None
    log_path = pathlib.Path(ckpt_dir).absolute().parent / "metrics.jsonl" if ckpt_dir is not None else None
    history: list[dict] = []
    if mngr is not None and mngr.latest_step() is not None:
        start = int(mngr.latest_step())
        abstract = {"trainable": trainable, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
        restored = mngr.restore(start, args=ocp.args.StandardRestore(
            jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract)))
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        if int(restored["step"]) != start:
            raise ValueError(f"checkpoint {start} in {ckpt_dir} holds step {int(restored['step'])}")
        if log_path is not None and log_path.exists():
            history = [h for h in map(json.loads, log_path.read_text().splitlines()) if h["step"] <= start]
            log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    elif log_path is not None and log_path.exists():
        log_path.unlink()
    step_fn = make_step(loss_fn, opt, project)
    bar = range(start, cfg.steps)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, initial=start, total=cfg.steps, desc="train", unit="step")
    sched = schedule(cfg)
    for s in bar:
        trainable, opt_state, loss, metrics = step_fn(trainable, opt_state, frozen, batch_fn(s))
        done = s + 1
        if done % cfg.log_every == 0 or done == cfg.steps or done == 1:
            rec = {"step": done, "loss": float(loss), "lr": float(sched(s)),
                   **{k: float(v) for k, v in metrics.items()}}
            history.append(rec)
            if progress:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
            elif done % (cfg.log_every * 10) == 0 or done == cfg.steps:
                print(json.dumps(rec), flush=True)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if mngr is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            mngr.save(done, args=ocp.args.StandardSave(
                {"trainable": trainable, "opt_state": opt_state, "step": jnp.asarray(done, jnp.int32)}), force=True)
            if die_after is not None and done >= die_after:
                mngr.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    return trainable, history
