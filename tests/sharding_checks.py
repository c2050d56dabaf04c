"""Checks of kvjax.sharding on 8 host devices, run by tests/test_sharding.py in a subprocess
(XLA_FLAGS must be set before jax starts, and the rest of the suite keeps one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py OUT.json

Every check compares a sharded run with the same call on one device (no mesh) and records
what it measured; the pytest side asserts. One process, so the model compiles once per mesh.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import sharding
from kvjax.compression import Compression
from kvjax.generate import forward_jit, generate, init_engine_cache
from kvjax.policies.adakv import AdaKV
from kvjax.policies.base import Budget
from kvjax.policies.snapkv import SnapKV
from kvjax.quant import make_cache_init
from models.config import ModelConfig
from models.llama import init_params, unstack_params

# 8 kv heads (so every mesh of 8 devices splits them), head_dim 32 (the GPU kernels' constraints,
# for the interpret-mode kernels under shard_map), vocabulary and MLP divisible by 8.
CFG = ModelConfig(name="tiny8", vocab_size=128, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8,
                  head_dim=32, ffn_dim=128, rope_theta=10000.0)
MESHES = ((8, 1), (2, 4), (1, 8))
NEW = 6


def prompts():
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(1, CFG.vocab_size, size=int(n))] for n in rng.integers(20, 40, size=8)]


def int_leaves(cache):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(cache) if jnp.issubdtype(x.dtype, jnp.integer)]


def same_ints(a, b) -> bool:
    la, lb = int_leaves(a), int_leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_generate(params, out):
    """Dense generate on every mesh: tokens, per-device cache bytes, shard shapes; prefill logits."""
    ps = prompts()
    kw = dict(eos_ids=(), bucket=8)
    ref = generate(params, CFG, ps, NEW, **kw)
    from kvjax.generate import left_pad
    tokens, positions = left_pad(ps, 0, 8)
    ref_cache = init_engine_cache(CFG, len(ps), tokens.shape[1], jnp.float32)
    ref_logits = np.asarray(forward_jit(params, jnp.asarray(tokens), jnp.asarray(positions), ref_cache, CFG,
                                        all_logits=True)[0])
    for d, m in MESHES:
        mesh = sharding.make_mesh(f"data={d},model={m}")
        res = generate(params, CFG, ps, NEW, mesh=mesh, **kw)
        keys = res.cache.layers[0].keys
        sp = sharding.shard_params(params, CFG, mesh)
        cache = sharding.shard_cache(init_engine_cache(CFG, len(ps), tokens.shape[1], jnp.float32), CFG, mesh)
        with sharding.use(mesh):
            logits = forward_jit(sp, *sharding.shard_batch((jnp.asarray(tokens), jnp.asarray(positions)), mesh),
                                 cache, CFG, all_logits=True)[0]
        out[f"dense_{d}x{m}"] = dict(
            tokens_equal=res.tokens == ref.tokens, cache_ints_equal=same_ints(res.cache, ref.cache),
            logits_rel_err=rel_err(logits, ref_logits),
            cache_bytes=res.stats["cache_bytes"], cache_bytes_per_device=res.stats["cache_bytes_per_device"],
            key_shard_shape=list(keys.addressable_shards[0].data.shape), key_shape=list(keys.shape),
            wq_shard_shape=list(sp["layers"][0]["wq"].addressable_shards[0].data.shape),
            wo_spec=str(sp["layers"][0]["wo"].sharding.spec))


def check_policies_and_quant(params, out):
    """KIVI-4, SnapKV 50% (per-head top-k) and AdaKV (cross-head budget, packed cache) generate on
    the (2, 4) mesh vs one device; then one more decode step over the dense and KIVI caches with the
    Pallas kernels interpreted per device under shard_map vs the one-device XLA step.

    (Whole interpreted generates are checked on one device in test_kernels_dispatch; here the
    kernel's per-device split is what is new, and one decode step exercises it.)"""
    ps = prompts()
    mesh = sharding.make_mesh("data=2,model=4")
    kw = dict(eos_ids=(), bucket=8)
    cases = {
        "dense": {},
        "kivi4": dict(cache_init=make_cache_init("kivi4", group=16, residual=32)),
        "snapkv50": dict(compression=Compression(SnapKV(window=4, kernel=3), Budget(ratio=0.5))),
        "adakv50": dict(compression=Compression(AdaKV(scorer=SnapKV(window=4, kernel=3), kv_heads=8),
                                                Budget(ratio=0.5))),
    }
    runs = {}
    for name, extra in cases.items():
        ref = generate(params, CFG, ps, NEW, **kw, **extra)
        res = generate(params, CFG, ps, NEW, mesh=mesh, **kw, **extra)
        runs[name] = ref, res
        layer = res.cache.layers[0] if hasattr(res.cache, "layers") else res.cache
        leaf = jax.tree_util.tree_leaves(layer)[0]
        out[name] = dict(tokens_equal=res.tokens == ref.tokens, cache_ints_equal=same_ints(res.cache, ref.cache),
                         attention=res.stats["attention"], cache_type=type(layer).__name__,
                         first_leaf_spec=str(leaf.sharding.spec),
                         cache_bytes=res.stats["cache_bytes"],
                         cache_bytes_per_device=res.stats["cache_bytes_per_device"])
    # the next decode step (the last generated token, at its position) over each cache: XLA on one
    # device vs the GPU kernel interpreted per device under shard_map on the mesh
    from kvjax.generate import _forward
    sp = sharding.shard_params(params, CFG, mesh)
    tok = jnp.asarray([[t[-1]] for t in runs["dense"][0].tokens], jnp.int32)
    pos = jnp.asarray([[len(p) + NEW - 1] for p in ps], jnp.int32)
    for name in ("dense", "kivi4"):
        ref, res = runs[name]
        with sharding.use(mesh):
            jaxpr = str(jax.make_jaxpr(lambda p, c: _forward(p, tok, pos, c, CFG, attention="interpret"))(
                sp, res.cache))
            got = forward_jit(sp, *sharding.shard_batch((tok, pos), mesh), res.cache, CFG, attention="interpret")[0]
        want = forward_jit(params, tok, pos, ref.cache, CFG, attention="xla")[0]
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        out[f"{name}_interpret_step"] = dict(
            shard_map="shard_map" in jaxpr, pallas_call="pallas_call" in jaxpr,
            logits_rel_err=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
            same_next_token=bool(np.array_equal(got.argmax(-1), want.argmax(-1))))


def check_training(out):
    """Locret heads: loss and gradients with the batch over `data` and the backbone over `model`
    equal the one-device ones; two `train` steps on the mesh give the same heads."""
    from kvjax.policies.locret import HeadSpec, init_heads
    from train.locret import LocretTrainConfig, make_loss
    from train.loop import TrainConfig, make_optimizer, train
    tc = TrainConfig(steps=2, batch_size=8, warmup_steps=1, dtype="float32", log_every=1)
    cfg = LocretTrainConfig(model="tiny", train=tc)
    frozen = init_params(CFG, jax.random.PRNGKey(1), scale=0.25, stacked=True)
    heads = init_heads(HeadSpec.for_model(CFG, 16), jax.random.PRNGKey(2))
    rng = np.random.default_rng(3)
    batches = [{"prompt": jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 24)), jnp.int32),
                "labels": jnp.asarray(rng.random((8, CFG.n_layers, CFG.n_kv_heads, 24)), jnp.float32)}
               for _ in range(2)]
    loss_fn = make_loss(CFG, cfg)
    vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, _), grads = vg(heads, frozen, batches[0])
    mesh = sharding.make_mesh("data=2,model=4")
    specs = sharding.param_specs(frozen, CFG, mesh)
    fs = sharding.place(frozen, specs, mesh)
    (loss_s, _), grads_s = vg(sharding.replicate(heads, mesh), fs, sharding.shard_batch(batches[0], mesh))
    g_err = max(rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(grads_s), jax.tree_util.tree_leaves(grads)))
    one, _ = train(loss_fn, heads, frozen, lambda s: batches[s], tc, progress=False)
    many, _ = train(loss_fn, heads, frozen, lambda s: batches[s], tc, progress=False, mesh=mesh, frozen_specs=specs)
    h_err = max(rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(many), jax.tree_util.tree_leaves(one)))
    del make_optimizer
    out["train"] = dict(loss=float(loss), loss_sharded=float(loss_s), grad_rel_err=g_err, heads_rel_err_2_steps=h_err,
                        wq_spec=str(fs["layers"]["wq"].sharding.spec),
                        batch_spec=str(sharding.shard_batch(batches[0], mesh)["labels"].sharding.spec),
                        trained_spec=str(jax.tree_util.tree_leaves(many)[0].sharding.spec))


def check_checkpoint(params, out):
    """Orbax: params saved from the (2, 4) mesh restore onto (8, 1) with (8, 1)'s shardings."""
    m24, m81 = sharding.make_mesh("data=2,model=4"), sharding.make_mesh("data=8,model=1")
    saved = sharding.shard_params(params, CFG, m24)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        sharding.save(path, saved)
        target = sharding.abstract(params, sharding.param_specs(params, CFG, m81), m81)
        back = sharding.restore(path, target)
    wq = back["layers"][0]["wq"]
    out["checkpoint"] = dict(
        equal=all(np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params))),
        saved_mesh=dict(saved["layers"][0]["wq"].sharding.mesh.shape), restored_mesh=dict(wq.sharding.mesh.shape),
        restored_spec=str(wq.sharding.spec), restored_shard_shape=list(wq.addressable_shards[0].data.shape))


def check_errors(out):
    """Bad meshes and axes that do not divide: clear errors (messages recorded)."""
    errs = {}
    for name, fn in {
        "too_many_devices": lambda: sharding.make_mesh("data=4,model=4"),
        "bad_spec": lambda: sharding.make_mesh("data=2,pipe=4"),
        "batch": lambda: sharding.plan(CFG, sharding.make_mesh("data=4,model=2"), batch=6),
        "heads": lambda: sharding.plan(ModelConfig(name="h12", vocab_size=128, d_model=64, n_layers=1,
                                                   n_heads=12, n_kv_heads=4, head_dim=16, ffn_dim=128),
                                       sharding.make_mesh("data=1,model=8")),
        "generate_batch": lambda: generate(init_params(CFG, jax.random.PRNGKey(0)), CFG, prompts()[:3], 2,
                                           mesh=sharding.make_mesh("data=2,model=4")),
    }.items():
        try:
            fn()
            errs[name] = None
        except ValueError as e:
            errs[name] = str(e)
    # kv heads that do not divide the model axis: replicated over it, and said so
    cfg2 = ModelConfig(name="kv2", vocab_size=128, d_model=64, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=16,
                       ffn_dim=128)
    mesh = sharding.make_mesh("data=2,model=4")
    p = sharding.plan(cfg2, mesh, batch=4)
    cache = init_engine_cache(cfg2, 4, 8)
    errs["kv_replicated"] = dict(notes=list(p.notes),
                                 cache_spec=str(sharding.cache_specs(cache, cfg2, mesh).layers[0].keys),
                                 wk_spec=str(sharding.param_specs(init_params(cfg2, jax.random.PRNGKey(0)), cfg2,
                                                                  mesh)["layers"][0]["wk"]))
    out["errors"] = errs


def check_eval(params, out):
    """`run_grid(mesh=)` (what `python -m kvjax eval --mesh` calls) on the (1, 8) mesh: the full-cache
    and SnapKV rows' KL, perplexity and cache bytes equal the one-device ones."""
    from kvjax.eval.harness import EvalConfig, run_grid
    rng = np.random.default_rng(5)
    tokens = ([int(t) for t in rng.integers(1, CFG.vocab_size, 32)], [int(t) for t in rng.integers(1, CFG.vocab_size, 8)])
    ecfg = EvalConfig(policies=("snapkv:window=4:kernel=3",), budgets=(Budget(ratio=0.5),), needle_tasks=(),
                      context_tokens=32, continuation_tokens=8, decode_probe=0)
    kw = dict(tokenizer=None, text="", ecfg=ecfg, progress=False, tokens=tokens)
    one = run_grid(params, CFG, **kw)
    many = run_grid(params, CFG, mesh=sharding.make_mesh("data=1,model=8"), **kw)
    out["eval"] = [dict(policy=a["policy"], kl=(a["kl"], b["kl"]), ppl=(a["ppl"], b["ppl"]),
                        cache_bytes=(a["cache_bytes"], b["cache_bytes"]), notes=(a["notes"], b["notes"]))
                   for a, b in zip(one, many)]
    try:
        run_grid(params, CFG, mesh=sharding.make_mesh("data=2,model=4"), **kw)
        out["eval_data2"] = None
    except ValueError as e:
        out["eval_data2"] = str(e)


def check_nnx(out):
    """The NNX module's Params carry the logical axes; Flax's rules map them to the same specs."""
    from flax import nnx
    from models.nnx_llama import Llama, params_of
    mesh = sharding.make_mesh("data=2,model=4")
    model = sharding.shard_model(Llama(CFG, rngs=nnx.Rngs(0)), mesh)
    params = params_of(model)
    want = sharding.param_specs(params, CFG, mesh)
    got = jax.tree_util.tree_map(lambda x: x.sharding.spec, params)
    out["nnx"] = dict(same_specs=jax.tree_util.tree_map(str, got) == jax.tree_util.tree_map(
        str, want, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        w_gate_spec=str(got["layers"][0]["w_gate"]))


def main():
    import time
    out = {"devices": jax.device_count(), "seconds": [], "cpu_seconds": []}   # per check: wall, process CPU
    params = unstack_params(init_params(CFG, jax.random.PRNGKey(0), scale=0.25))
    for fn in (lambda: check_generate(params, out), lambda: check_policies_and_quant(params, out),
               lambda: check_training(out), lambda: check_checkpoint(params, out), lambda: check_errors(out),
               lambda: check_nnx(out), lambda: check_eval(params, out)):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            fn()
            out["seconds"].append(round(time.perf_counter() - t0, 1))
            out["cpu_seconds"].append(round(time.process_time() - c0, 1))
        except Exception:
            out.setdefault("failures", []).append(traceback.format_exc())
        with open(sys.argv[1], "w") as f:          # after every check: a run cut short keeps its timings
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
