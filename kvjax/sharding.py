"""SPMD over a device mesh with axes `data` x `model`: JAX's own machinery, one place for the rules.

    mesh = make_mesh("data=2,model=4")            # jax.sharding.Mesh over the first 8 devices
    result = generate(params, config, prompts, mesh=mesh)     # or the CLI: --mesh data=2,model=4

What is sharded how (logical axes -> mesh axes, `logical_rules`):

- Parameters, tensor-parallel over `model`: every weight carries logical axis names
  (`models.nnx_llama.LOGICAL_AXES`; the NNX `Llama`'s Params hold them as `out_sharding`
  metadata), mapped here to mesh axes: q heads (`wq` columns, `wo` rows, `bq`), kv heads (`wk`,
  `wv` columns, `bk`, `bv`), the MLP hidden (`w_gate`, `w_up` columns, `w_down` rows) and the
  vocabulary (`embed` rows, `lm_head` columns) over `model`; `d_model`, head_dim and the norms
  replicated. `jax.jit` partitions the computation from these input shardings (GSPMD/Shardy:
  the row-parallel matmuls end in an all-reduce over `model`).
- Caches (`cache_specs`): every array of a layer's cache whose leading axis is the batch is
  sharded over `data`; when its second axis is the kv heads (dense `KVCache`, KIVI and the
  other quantized caches of `kvjax.quant/LAYOUT.md`: codes, scales, residuals, lengths,
  positions) it is also sharded over `model`. A head-packed cache (`kvjax.packed.PackedCache`,
  AdaKV's ragged layout: the heads share one slot pool) is sharded over `data` only. A policy's
  per-head state `[layers, batch, kv_heads, slots]` follows the same rule.
- When the kv heads do not divide the `model` axis, the kv-head weights and the caches are
  REPLICATED over `model` (the q heads, MLP and vocabulary stay sharded); `plan(...).notes` says
  so. Batch not divisible by `data`, q heads / MLP hidden not divisible by `model`, or a mesh
  larger than the devices are errors.
- Cross-head steps of policies (AdaKV's layer-wide top-k over all heads' scores) are left to
  the partitioner, which inserts the collectives (all-gather over `model`) in the jitted code;
  per-head top-k stays local. Results are equal to one device (tests/test_sharding.py).
- Pallas kernels (custom calls the partitioner cannot split) run per device through
  `per_device`: `jax.shard_map` over the mesh of the current context (`jax.set_mesh`, which
  `generate(mesh=)` enters), every kernel operand split on its [batch, heads] axes.

Multi-host: call `jax.distributed.initialize()` in every process first; `make_mesh` then spans
`jax.devices()` (all processes' devices) and everything above is per-array and global (see
README "Sharded generation").
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig

AXES = ("data", "model")


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,model=4" -> {"data": 2, "model": 4} (a missing axis is 1)."""
    sizes = {a: 1 for a in AXES}
    seen = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"mesh {spec!r}: expected 'data=N,model=M' (axes {AXES}), got {part!r}")
        if name in seen:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if n <= 0:
            raise ValueError(f"mesh {spec!r}: size of {name!r} must be positive, got {n}")
        sizes[name] = n
        seen.add(name)
    if not seen:
        raise ValueError(f"mesh {spec!r}: expected 'data=N,model=M'")
    return sizes


def make_mesh(spec, devices: Optional[Sequence] = None) -> Mesh:
    """A `Mesh` with axes ("data", "model") from "data=2,model=4", a dict or a (data, model) pair,
    over the first data*model of `devices` (default `jax.devices()`: all processes' devices).
    Axes are `Auto`: the partitioner propagates the input shardings through jitted code."""
    if isinstance(spec, str):
        sizes = parse_mesh(spec)
    elif isinstance(spec, dict):
        sizes = parse_mesh(",".join(f"{k}={v}" for k, v in spec.items()))
    else:
        d, m = spec
        sizes = parse_mesh(f"data={d},model={m}")
    devices = list(jax.devices() if devices is None else devices)
    n = sizes["data"] * sizes["model"]
    if n > len(devices):
        raise ValueError(f"mesh data={sizes['data']},model={sizes['model']} needs {n} devices, but only "
                         f"{len(devices)} are available ({jax.default_backend()}); on cpu set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts")
    grid = np.asarray(devices[:n], dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def axis_size(mesh, name: str) -> int:
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)) if hasattr(mesh, "axis_sizes") else \
        int(mesh.shape.get(name, 1))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """rules: logical axis -> mesh axis (or None: replicated); notes: what was replicated and why."""

    rules: tuple[tuple[str, Optional[str]], ...]
    notes: tuple[str, ...] = ()

    def mesh_axis(self, logical: str) -> Optional[str]:
        return dict(self.rules)[logical]


def plan(config: ModelConfig, mesh: Mesh, batch: Optional[int] = None) -> ShardingPlan:
    """The logical-axis rules for this model on this mesh (the one place they are decided).

    Raises ValueError when `batch` is not divisible by `data` or the q heads / MLP hidden by `model`."""
    data, model = axis_size(mesh, "data"), axis_size(mesh, "model")
    if batch is not None and batch % data:
        raise ValueError(f"batch {batch} is not divisible by the mesh's data axis ({data}): use a batch that "
                         f"is a multiple of {data} or a smaller data axis")
    if config.n_heads % model:
        raise ValueError(f"{config.name}: {config.n_heads} attention heads are not divisible by the mesh's model "
                         f"axis ({model})")
    if config.ffn_dim % model:
        raise ValueError(f"{config.name}: MLP hidden {config.ffn_dim} is not divisible by the mesh's model axis "
                         f"({model})")
    notes = []
    kv = "model"
    if config.n_kv_heads % model:
        kv = None
        notes.append(f"{config.n_kv_heads} kv heads do not divide model={model}: kv-head weights and the KV "
                     f"cache are replicated over 'model' (batch still over 'data')")
    vocab = "model"
    if config.vocab_size % model:
        vocab = None
        notes.append(f"vocabulary {config.vocab_size} does not divide model={model}: embedding and LM head "
                     f"replicated")
    rules = (("batch", "data"), ("q_heads", "model"), ("kv_heads", kv), ("mlp", "model"), ("vocab", vocab),
             ("embed", None), ("head_dim", None), ("layers", None), ("seq", None))
    return ShardingPlan(rules=rules, notes=tuple(notes))


def _spec(logical: Sequence[str], rules: ShardingPlan) -> P:
    return P(*(rules.mesh_axis(a) for a in logical))


def param_specs(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """PartitionSpecs for the params pytree of `models.llama.forward` (per-layer tuple or stacked
    layers dict; the stacked layer axis is replicated), from `models.nnx_llama.LOGICAL_AXES`."""
    from models.nnx_llama import LOGICAL_AXES
    rules = plan(config, mesh)
    out = {}
    for name, value in params.items():
        if name == "layers":
            if isinstance(value, (tuple, list)):
                out[name] = tuple({k: _spec(LOGICAL_AXES[k], rules) for k in lp} for lp in value)
            else:
                out[name] = {k: _spec(("layers",) + LOGICAL_AXES[k], rules) for k in value}
        else:
            out[name] = _spec(LOGICAL_AXES[name], rules)
    return out


def model_specs(model, mesh: Mesh):
    """PartitionSpecs of an NNX `models.nnx_llama.Llama`'s state, read from its Params' logical
    `out_sharding` metadata through `nnx.logical_axis_rules` (Flax's own mapping)."""
    from flax import nnx
    with nnx.logical_axis_rules(plan(model.config, mesh).rules):
        return nnx.get_partition_spec(nnx.state(model))


def shard_model(model, mesh: Mesh):
    """The NNX model with every Param placed on `mesh` per its logical axes (a new module)."""
    from flax import nnx
    graphdef, state = nnx.split(model)
    specs = model_specs(model, mesh)
    state = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
    return nnx.merge(graphdef, state)


def shard_params(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """The params pytree placed on `mesh` (tensor-parallel over `model`)."""
    return place(params, param_specs(params, config, mesh), mesh)


def place(tree, specs, mesh: Mesh):
    """`jax.device_put` every leaf of `tree` with `NamedSharding(mesh, spec)` (specs: same structure)."""
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                       is_leaf=lambda x: isinstance(x, P))
    return jax.device_put(tree, shardings)


def _layer_cache_specs(layer, batch: int, heads: Optional[str], lead: int):
    """Specs of one cache pytree whose arrays are [*lead axes, batch, kv_heads?, ...]."""
    from kvjax.packed import PackedCache
    head_axis = None if isinstance(layer, PackedCache) else heads
    prefix = (None,) * lead

    def spec(x, kv_heads):
        if x.ndim <= lead or x.shape[lead] != batch:
            return P()
        if head_axis is not None and x.ndim > lead + 1 and x.shape[lead + 1] == kv_heads:
            return P(*prefix, "data", head_axis)
        return P(*prefix, "data")
    return spec


def cache_specs(cache, config: ModelConfig, mesh: Mesh):
    """PartitionSpecs for a cache pytree (an engine `LayerwiseCache` or a cache stacked over
    layers) or a policy state [layers, batch, kv_heads, slots]: see the module docstring."""
    from kvjax.layerwise import LayerwiseCache
    heads = plan(config, mesh).mesh_axis("kv_heads")
    leaves = [x for x in jax.tree_util.tree_leaves(cache) if getattr(x, "ndim", 0) > 0]
    if isinstance(cache, LayerwiseCache):
        layers = tuple(_tree_specs(lc, _layer_cache_specs(lc, _batch_of(lc, 0), heads, 0), config)
                       for lc in cache.layers)
        return dataclasses.replace(cache, layers=layers)
    batch = leaves[0].shape[1] if leaves and leaves[0].ndim > 1 else 0
    return _tree_specs(cache, _layer_cache_specs(cache, batch, heads, 1), config)


def _batch_of(layer, lead: int) -> int:
    leaves = [x for x in jax.tree_util.tree_leaves(layer) if getattr(x, "ndim", 0) > lead]
    return leaves[0].shape[lead] if leaves else 0


def _tree_specs(tree, spec, config):
    return jax.tree_util.tree_map(lambda x: spec(x, config.n_kv_heads), tree)


def shard_cache(cache, config: ModelConfig, mesh: Mesh):
    """The cache (or policy state) placed on `mesh` per `cache_specs`."""
    return place(cache, cache_specs(cache, config, mesh), mesh)


def batch_specs(tree):
    """P("data") on the leading (batch) axis of every array of an input pytree (tokens, labels, ...)."""
    return jax.tree_util.tree_map(lambda x: P("data") if np.ndim(x) else P(), tree)


def shard_batch(tree, mesh: Mesh):
    return place(tree, batch_specs(tree), mesh)


def replicate(tree, mesh: Mesh):
    return place(tree, jax.tree_util.tree_map(lambda _: P(), tree), mesh)


def use(mesh: Optional[Mesh]):
    """`jax.set_mesh(mesh)` (what `per_device` reads at trace time), or a null context for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def device_bytes(tree) -> dict:
    """Bytes each device holds of a pytree of (sharded) arrays: {device id: bytes}."""
    out: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        if not hasattr(x, "addressable_shards"):
            continue
        for s in x.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + int(np.prod(s.data.shape)) * x.dtype.itemsize
    return out


def per_device(fn, *args):
    """Run `fn(*args)` once per device under `jax.shard_map` over the current mesh (`jax.set_mesh`),
    splitting every operand on its leading [batch, heads] axes: batch over `data` when divisible,
    heads over `model` when every operand's head axis is divisible (q heads and kv heads alike, so
    each device keeps whole GQA groups), else those axes stay whole (replicated). Without a mesh
    (or a one-device mesh) it is just `fn(*args)`. For Pallas kernels: a custom call cannot be
    partitioned by XLA, so each device runs the kernel on its own shard; the result is
    [batch, heads, ...] sharded the same way."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(AXES) <= set(mesh.axis_names):
        return fn(*args)
    data, model = axis_size(mesh, "data"), axis_size(mesh, "model")
    b = args[0].shape[0]
    batch_axis = "data" if b % data == 0 and all(a.shape[0] == b for a in args) else None
    heads_ok = all(a.ndim >= 2 and a.shape[1] % model == 0 for a in args)
    head_axis = "model" if heads_ok else None
    spec = P(batch_axis, head_axis)
    specs = tuple(spec for _ in args)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)


def abstract(tree, specs, mesh: Mesh):
    """`jax.ShapeDtypeStruct`s of `tree` carrying `NamedSharding(mesh, spec)`: the target of an
    Orbax restore onto `mesh` (any mesh shape: Orbax reads each device's slices)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, s)), tree, specs,
        is_leaf=lambda x: isinstance(x, P))


def save(path, tree) -> None:
    """Save a pytree of (sharded) arrays with Orbax (every process writes its own shards)."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)
        ckpt.wait_until_finished()


def restore(path, target: Any):
    """Restore an Orbax checkpoint onto the shardings of `target` (see `abstract`), whatever mesh it
    was saved from."""
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(path, target)
