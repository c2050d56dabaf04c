"""Sharded engine benchmark (issue 21): random-init Llama-3-8B (bf16) through `generate(mesh=)`
over 1/2/4/8 GPUs, dense / KIVI-4 / SnapKV 10 %.

    # one H200 (the 1-GPU baseline; every mesh larger than the devices is skipped, said so)
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/sharded.py --shapes 8x16384
    # 8 GPUs: tensor-parallel (kv heads over "model") at a shape that fits one GPU, then one that does not
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/sharded.py --gpus 1,2,4,8 --shapes 8x16384
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/sharded.py --gpus 4,8 --shapes 32x65536 --methods dense,kivi4,snapkv10
    # data-parallel instead: --layout data (batch over "data"); mixed: --layout data=2 (rest on model)
    # CPU smoke test (8 host devices, tiny model)
    PYTHONPATH=. python benchmarks/sharded.py --tiny

Per row (mesh, shape, method): a warm-up call compiles, the second is timed (the engine's own
prefill_s / decode_s). prefill tok/s = batch * context / prefill_s; decode ms/step = decode_s /
(new_tokens - 1); per-GPU memory = the largest `peak_bytes_in_use` over the devices (process-wide
peak: rows run in order, so a later row's peak is a bound); cache GB per GPU = the engine's
`cache_bytes_per_device`. Scaling efficiency = throughput(n GPUs) / (n * throughput(1 GPU)) at the
same shape and method (prefill tokens/s and decode tokens/s); "same tokens" compares row 0's
tokens with the 1-GPU run (greedy). Every row is printed when it finishes and the JSON (`--out`,
default $OUT/sharded.json) is rewritten after every row.

Ceilings, measured on each mesh before its rows: the copy bandwidth per device, `a + 1` on a bf16
array sharded over every device of the mesh (`--copy-gib` per device, donated, all devices at
once; bytes read + written per device / median seconds; --tiny: 8 MiB). Per row, the decode
roofline per device = (weight bytes on one device, excl. the embedding table when it is not the
LM head, + that device's live cache bytes at mid-decode) / that bandwidth; "x roof" = measured
ms/step / roofline (1.0 is the floor; the collectives of tensor parallelism come on top). Live
cache bytes = cache bytes per device * live tokens per head at mid-decode / slots per head.
"""
from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:   # 8 host devices: must be set before jax starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import method_kwargs, parse_shapes, tiny_config  # noqa: E402
from kvjax import sharding  # noqa: E402
from kvjax.generate import generate  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from models.config import get_config  # noqa: E402
from models.llama import init_params  # noqa: E402


def mesh_for(n: int, layout: str) -> str:
    if layout == "model":
        return f"data=1,model={n}"
    if layout == "data":
        return f"data={n},model=1"
    d = int(layout.split("=")[1])          # data=D: D on data, the rest on model
    return f"data={min(d, n)},model={max(n // d, 1)}"


def sharded_params(config, mesh, dtype):
    """Random parameters created directly in their shards (no one-device copy of the model)."""
    key = jax.random.PRNGKey(0)
    make = lambda k: init_params(config, k, dtype)
    specs = sharding.param_specs(jax.eval_shape(make, key), config, mesh)
    shard = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                   is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return jax.jit(make, out_shardings=shard)(key)


def copy_bps_per_device(mesh, nbytes_per_device: int, reps: int = 10) -> float:
    """Copy bandwidth per device (bytes read + written per second): `a + 1` on a bf16 array of
    `nbytes_per_device` per device, sharded over every device of `mesh`, donated; median of `reps`."""
    n = mesh.devices.size
    shard = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    elems = max(nbytes_per_device // 2 // 128, 1) * 128
    x = jax.jit(lambda: jnp.zeros((n * elems,), jnp.bfloat16), out_shardings=shard)()
    step = jax.jit(lambda a: a + 1, donate_argnums=0, out_shardings=shard)
    box = [jax.block_until_ready(step(x))]
    del x
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        box[0] = jax.block_until_ready(step(box[0]))
        times.append(time.perf_counter() - t0)
    return 2 * elems * 2 / statistics.median(times)


def decode_bytes_per_device(params, config, res, context: int, new: int) -> tuple[int, float]:
    """(weight bytes a decode step reads on the busiest device, its live cache bytes at mid-decode):
    weights = that device's shards of every parameter except an untied embedding table (a decode
    step gathers one row of it); cache = `cache_bytes_per_device` * live tokens / slots per head."""
    skip = () if config.tie_embeddings else ("embed",)
    weights = sharding.device_bytes({k: v for k, v in params.items() if k not in skip})
    cache = res.cache
    layer = cache.layers[0] if hasattr(cache, "layers") else cache
    cap = int(getattr(cache, "capacity", getattr(layer, "capacity", context + new)))
    positions = getattr(layer, "positions", None)
    live_end = (float(jnp.mean(jnp.sum(positions >= 0, axis=-1, dtype=jnp.float32))) if positions is not None
                else float(context + new - 1))       # a quantized cache keeps every token
    live_mid = max(live_end - (new - 1) / 2, 0.0)
    return max(weights.values()), res.stats["cache_bytes_per_device"] * live_mid / cap


def peak_gb() -> float:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
    return max(peaks) / 1e9 if peaks else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4,8", help="device counts (skipped when more than there are)")
    ap.add_argument("--layout", default="model", help="model (tensor-parallel) | data | data=D")
    ap.add_argument("--shapes", default=None, help="BATCHxCONTEXT list (default 8x16384; --tiny 8x128)")
    ap.add_argument("--methods", default="dense,kivi4,snapkv10")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (--tiny 4)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 4096; --tiny 32)")
    ap.add_argument("--copy-gib", type=float, default=None,
                    help="copy-ceiling buffer per device in GiB (default 2; --tiny 8 MiB)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "sharded.json") if os.environ.get("OUT") else None)
    a = ap.parse_args()
    config = tiny_config() if a.tiny else get_config("llama3-8b")
    if a.tiny:
        config = config.__class__(**{**config.__dict__, "n_heads": 16, "n_kv_heads": 8, "head_dim": 32,
                                     "d_model": 128})
    shapes = parse_shapes(a.shapes or ("8x128" if a.tiny else "8x16384"))
    new = a.new_tokens or (4 if a.tiny else 64)
    chunk = a.chunk or (32 if a.tiny else 4096)
    dtype = jnp.float32 if a.tiny else jnp.bfloat16
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; {config.name}; layout {a.layout}",
          flush=True)
    rows, base = [], {}
    for n in (int(x) for x in a.gpus.split(",")):
        if n > jax.device_count():
            print(f"skip {n} devices: only {jax.device_count()}", flush=True)
            continue
        mesh = sharding.make_mesh(mesh_for(n, a.layout))
        copy_bytes = int((a.copy_gib if a.copy_gib is not None else (2 ** -7 if a.tiny else 2.0)) * 2 ** 30)
        bw = copy_bps_per_device(mesh, copy_bytes)
        print(f"{n} dev {dict(mesh.shape)}: copy bandwidth per device {bw / 1e9:.1f} GB/s "
              f"({copy_bytes / 2 ** 30:.3g} GiB per device)", flush=True)
        params = sharded_params(config, mesh, dtype)
        for b, t in shapes:
            rng = np.random.default_rng(0)
            prompts = [list(rng.integers(1, config.vocab_size, size=t)) for _ in range(b)]
            for method in a.methods.split(","):
                row = {"devices": n, "mesh": dict(mesh.shape), "batch": b, "context": t, "method": method}
                try:
                    kw = dict(chunk_size=chunk, cache_dtype=dtype, eos_ids=(), mesh=mesh, **method_kwargs(method))
                    generate(params, config, prompts, new, **kw)          # compile
                    t0 = time.perf_counter()
                    res = generate(params, config, prompts, new, **kw)
                    s = res.stats
                    w_bytes, c_bytes = decode_bytes_per_device(params, config, res, t, new)
                    roof_ms = 1e3 * (w_bytes + c_bytes) / bw
                    row.update(copy_GBps_per_device=bw / 1e9, weight_gb_per_device=w_bytes / 1e9,
                               live_cache_gb_per_device_mid=c_bytes / 1e9, roofline_ms=roof_ms,
                               x_roofline=1e3 * s["decode_s"] / (new - 1) / roof_ms)
                    row.update(prefill_tok_s=b * t / s["prefill_s"], decode_ms=1e3 * s["decode_s"] / (new - 1),
                               decode_tok_s=b * (new - 1) / s["decode_s"], wall_s=time.perf_counter() - t0,
                               cache_gb_per_device=s["cache_bytes_per_device"] / 1e9, cache_gb=s["cache_bytes"] / 1e9,
                               peak_gb_per_device=peak_gb(), attention=s["attention"],
                               notes=list(s.get("sharding_notes", ())))
                    key = (b, t, method)
                    if n == 1 or key not in base:
                        base.setdefault(key, dict(row, tokens=res.tokens[0], n=n))
                    ref = base[key]
                    scale = n / ref["n"]
                    row.update(prefill_eff=row["prefill_tok_s"] / (scale * ref["prefill_tok_s"]),
                               decode_eff=row["decode_tok_s"] / (scale * ref["decode_tok_s"]),
                               eff_vs_devices=ref["n"], same_tokens=res.tokens[0] == ref["tokens"])
                    del res
                    print(f"{n} dev {row['mesh']} {b}x{t} {method:9s} prefill {row['prefill_tok_s']:10.0f} tok/s "
                          f"(eff {row['prefill_eff']:.2f})  decode {row['decode_ms']:8.2f} ms/step "
                          f"(eff {row['decode_eff']:.2f}, roof {row['roofline_ms']:.2f} ms, "
                          f"x{row['x_roofline']:.2f})  cache/dev {row['cache_gb_per_device']:.2f} GB  "
                          f"peak/dev {row['peak_gb_per_device']:.1f} GB  same tokens {row['same_tokens']}",
                          flush=True)
                except Exception as e:  # noqa: BLE001 (a row that fails, e.g. out of memory, is recorded)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{n} dev {b}x{t} {method}: {row['error']}", flush=True)
                    traceback.print_exc(limit=2)
                rows.append(row)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(rows, f, indent=1, default=str)
        del params


if __name__ == "__main__":
    main()
