"""Decode-attention benchmark (GPU, one run, <= ~4 min): ceilings, baselines, our kernels + sweep.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode.py 2>&1 | tee $OUT/decode.log
    PYTHONPATH=. python benchmarks/decode.py --tiny     # CPU smoke test (interpret mode)

Llama-3-8B attention (32 q-heads, 8 kv-heads, head_dim 128), one query token, every head full, at
8x32768 and 32x32768 (--configs). Rows, printed as they finish and rewritten to
$OUT/decode.json (or benchmarks/results/decode.json) after each: torch `copy_` bandwidth (the
ceiling; bytes read + written), torch SDPA `enable_gqa` (cuDNN backend), jax.nn.dot_product_attention
(cudnn, else XLA), our bf16 dense kernel, KIVI-4, KIVI-2 (variants "stacked", "stacked_mask",
"stacked_asm", "dequant" side by side: the unpack A/B of issue 13; "stacked_asm"'s inline PTX is
checked here only, by its error vs the reference), token-sparse and page-sparse (pages of 64) with
2K of 32K selected: default vs `fused` (in-kernel query prep) vs `fused, num_splits=1` (no combine
op), and `count0` probes (the same call with every selection empty: the fixed cost per call). Per row: us, GB/s of the bytes the
kernel actually reads, that rate / copy bandwidth, speed-up vs our best bf16 row of the shape, and
the fraction of the ideal bytes ratio. Phase 1 times every kernel's default config at every shape;
phase 2 sweeps a few configs (block sizes, splits, warps/stages, variant) until --budget-s.
Every timed config's output is compared with `pallas_kernels.reference` (relative L2 error).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import reference  # noqa: E402
from pallas_kernels.gpu import common  # noqa: E402
from pallas_kernels.gpu.dense_decode import dense_decode  # noqa: E402
from pallas_kernels.gpu.kivi_decode import kivi_decode  # noqa: E402
from pallas_kernels.gpu.sparse_decode import sparse_decode  # noqa: E402

HQ, HKV, D, G, R, PAGE = 32, 8, 128, 32, 128, 64
L2_BYTES = 60 * 2 ** 20
KIVI_ORDER = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_resid", "v_resid"]


def splits_for(b, waves):
    return common.choose_splits(b, HKV, 1 << 20, None, waves=waves)


# the first PHASE1[kind] configs of sweeps(b)[kind] are timed side by side in phase 1 (the A/B
# of issue 13: KIVI unpack variants; sparse fused variant and the empty-selection probe)
PHASE1 = {"bf16": 1, "kivi4": 5, "kivi2": 5, "sparse": 5, "page": 4}


def sweeps(b):
    """Configs per kind: the first PHASE1[kind] in phase 1, the rest in the phase-2 sweep.
    KIVI: "stacked_asm" (the default: shift-free unpack in inline PTX prmt/and) vs "stacked"
    (shift unpack) vs "stacked_mask" (shift-free unpack in plain bit ops) vs "dequant" vs the
    default with 2 warps; phase 2
    sweeps the default's launch parameters (warps, pipeline stages, groups per tile, splits). Sparse: default vs
    fused (in-kernel query prep) vs fused with one split (no combine op); `count0` rows run the
    same call with every selection empty: the fixed cost (launch, XLA ops, partial writes)."""
    kivi = [{}, dict(variant="stacked"), dict(variant="stacked_mask"), dict(variant="dequant"),
            dict(num_warps=2)]   # 2 warps: KIVI-2 1.31x faster on H100 in a 2026-12-05 sweep
    launch = [dict(num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2, 3, 4)
              if (w, s) not in ((4, 2), (2, 2))]
    launch += [dict(tile_groups=t) for t in (8, 16)] + [dict(tile_groups=8, num_warps=8)]
    launch += [dict(num_splits=splits_for(b, w)) for w in (1, 2, 8)]
    return {
        "bf16": [{}, dict(block_k=128, num_stages=2), dict(num_splits=splits_for(b, 4)),
                 dict(block_k=32, num_stages=4)],
        "kivi4": kivi + launch,
        "kivi2": kivi + launch,
        "sparse": [{}, dict(fused=True), dict(fused=True, num_splits=1), dict(count0=True),
                   dict(count0=True, fused=True, num_splits=1),
                   dict(num_splits=splits_for(b, 8)), dict(fused=True, num_splits=splits_for(b, 8)),
                   dict(fused=True, num_splits=1, block_k=64, num_warps=8),
                   dict(block_k=64, num_splits=splits_for(b, 4))],
        "page": [dict(block_k=64), dict(block_k=64, fused=True),
                 dict(block_k=64, fused=True, num_splits=1), dict(block_k=64, count0=True),
                 dict(block_k=64, num_splits=splits_for(b, 8)),
                 dict(block_k=64, fused=True, num_splits=splits_for(b, 8)),
                 dict(block_k=128, fused=True, num_splits=1, num_warps=8)],
    }


def rand(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn, args_list, q, reps, trials=3):
    """(median s/call of fn(q, *args) over chained calls cycling args_list, output on args 0)."""
    outer = max(1, reps // len(args_list))

    def chain(q, all_args):
        first = fn(q, *all_args[0])

        def body(i, q):
            for a in all_args:
                out = fn(q, *a).reshape(-1)[: q.size]
                q = q + (out.reshape(q.shape) * 1e-6).astype(q.dtype)
            return q
        return jax.lax.fori_loop(0, outer, body, q), first

    f = jax.jit(chain)
    _, first = jax.block_until_ready(f(q, args_list))
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, args_list))
        ts.append((time.perf_counter() - t0 - 0) / (outer * len(args_list)))
    return statistics.median(ts), first


def n_copies(nbytes):
    return max(1, min(4, -(-2 * L2_BYTES // max(nbytes, 1))))


def torch_ceiling_and_sdpa(configs, reps):
    """torch copy_ bandwidth (read+write) and SDPA enable_gqa (cuDNN) per config; {} without CUDA."""
    try:
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            return None, {}
    except ImportError:
        return None, {}

    def cuda_time(f, n=reps):
        f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(3):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(n):
                f()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3 / n)
        return statistics.median(ts)

    src = torch.randn(2 ** 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / cuda_time(lambda: dst.copy_(src))
    del src, dst
    out = {}
    for b, t in configs:
        q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out[(b, t)] = ("torch_sdpa_gqa_cudnn", cuda_time(
                    lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
        except Exception as e:  # cuDNN backend refused: the default backend, labelled
            print(f"  torch cuDNN SDPA failed ({type(e).__name__}: {str(e)[:120]}); default backend")
            out[(b, t)] = ("torch_sdpa_gqa_default", cuda_time(
                lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
        del q, k, v
        torch.cuda.empty_cache()
    return bw, out


def jax_copy_bandwidth(tiny):
    x = jax.random.bits(jax.random.PRNGKey(0), (2 ** (18 if tiny else 29),), jnp.uint32)
    f = jax.jit(lambda a: a ^ 1)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(5):
        y = f(x)
    jax.block_until_ready(y)
    return 2 * x.nbytes * 5 / (time.perf_counter() - t0)


def make_inputs(b, t, kind, key):
    """(fn(q, *args, **cfg), args_list, bytes_read, ideal bytes ratio, reference(q, *args))."""
    dense_bytes = b * HKV * t * D * 4
    lens = jnp.full((b, HKV), t, jnp.int32)
    if kind in ("bf16", "jaxnn", "sparse", "page"):
        n_sel = t // 16
        sel_bytes = b * HKV * n_sel * D * 4
        nc = n_copies(dense_bytes if kind in ("bf16", "jaxnn") else sel_bytes)
        caches = [(rand(jax.random.fold_in(key, 2 * c), (b, HKV, t, D)),
                   rand(jax.random.fold_in(key, 2 * c + 1), (b, HKV, t, D))) for c in range(nc)]
        if kind == "bf16":
            return (lambda q, k, v, **c: dense_decode(q, k, v, lens, **c), caches, dense_bytes, 1.0,
                    lambda q, k, v: reference.dense_decode(q, k, v, lens))
        if kind == "jaxnn":
            tm = [(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) for k, v in caches]
            return (lambda q, k, v, **c: jax.nn.dot_product_attention(q[:, None], k, v, **c)[:, 0],
                    tm, dense_bytes, 1.0,
                    lambda q, k, v: reference.dense_decode(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), lens))
        p = 1 if kind == "sparse" else PAGE
        n = n_sel // p
        idx = jnp.sort(jax.random.permutation(jax.random.fold_in(key, 99), t // p)[:n]).astype(jnp.int32)
        idx = jnp.broadcast_to(idx, (b, HKV, n))
        cnt = jnp.full((b, HKV), n, jnp.int32)
        return (lambda q, k, v, count0=False, **c: sparse_decode(
                    q, k, v, idx, cnt * (0 if count0 else 1), page_size=p, **c), caches,
                sel_bytes + b * HKV * n * 4, dense_bytes / (sel_bytes + b * HKV * n * 4),
                lambda q, k, v: reference.sparse_decode(q, k, v, idx, cnt, page_size=p))
    bits = 4 if kind == "kivi4" else 2
    pk = D * bits // 8
    kl, vl = lens - lens % R, jnp.maximum(lens - R, 0)

    def one(c):
        ks = jax.random.split(jax.random.fold_in(key, 10 + c), 8)
        u8 = lambda k, s: jax.random.randint(k, s, 0, 256, jnp.int32).astype(jnp.uint8)
        return dict(k_codes=u8(ks[0], (b, HKV, t, pk)),
                    k_scale=(jax.random.uniform(ks[1], (b, HKV, t // G, D)) * 0.2).astype(jnp.float16),
                    k_min=rand(ks[2], (b, HKV, t // G, D), jnp.float16),
                    v_codes=u8(ks[3], (b, HKV, t, pk)),
                    v_scale=(jax.random.uniform(ks[4], (b, HKV, t, D // G)) * 0.2).astype(jnp.float16),
                    v_min=rand(ks[5], (b, HKV, t, D // G), jnp.float16),
                    k_resid=rand(ks[6], (b, HKV, R, D)), v_resid=rand(ks[7], (b, HKV, R, D)))
    kbytes = b * HKV * (t * (2 * pk + 2 * 2 * D // G + 2 * 2 * D // G) + R * D * 2)
    arrs = [one(c) for c in range(n_copies(kbytes))]
    args_list = [[a[n] for n in KIVI_ORDER] + [kl, vl, lens] for a in arrs]
    return (lambda q, *a, **c: kivi_decode(q, *a, bits=bits, group_size=G, **c), args_list,
            kbytes, dense_bytes / kbytes,
            lambda q, *a: reference.kivi_decode(q, *a, bits=bits, group_size=G))


class Report:
    def __init__(self, path, bw, bw_name):
        self.rows, self.path, self.bw, self.bw_name = [], path, bw, bw_name

    def add(self, b, t, name, cfg, s, nbytes, ideal=None, err=None):
        best = [r["us"] for r in self.rows if (r["batch"], r["ctx"]) == (b, t)
                and r["kernel"] == "ours_bf16" and r["us"] == r["us"]]
        us = s * 1e6
        row = dict(batch=b, ctx=t, kernel=name, config=cfg, us=us,
                   gbps=nbytes / s / 1e9 if s == s else float("nan"),
                   x_copy=nbytes / s / self.bw if s == s else float("nan"),
                   vs_bf16=(min(best) / us) if best and s == s else None,
                   ideal=ideal, relerr=err)
        if row["vs_bf16"] and ideal:
            row["of_ideal"] = row["vs_bf16"] / ideal
        self.rows.append(row)
        fmt = lambda x, f: ("-" if x is None else format(x, f))
        print(f"  {b}x{t} {name:<24} {json.dumps(cfg):<44} {us:9.1f} us {row['gbps']:8.1f} GB/s "
              f"{row['x_copy']:5.2f}x copy  vs bf16 {fmt(row['vs_bf16'], '.2f')}"
              f"{'' if ideal is None else f' (ideal {ideal:.2f}, ' + fmt(row.get('of_ideal'), '.2f') + ' of it)'}"
              f"  err {fmt(err, '.1e')}", flush=True)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(dict(copy_bw=self.bw, copy_bw_source=self.bw_name, jax=jax.__version__,
                           device=jax.devices()[0].device_kind, rows=self.rows), f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8x32768,32x32768")
    ap.add_argument("--kinds", default="bf16,kivi4,kivi2,sparse,page")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop the sweep after this")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test in interpret mode")
    a = ap.parse_args()
    start = time.time()
    configs = [tuple(int(x) for x in c.split("x")) for c in
               ("1x256" if a.tiny else a.configs).split(",")]
    kinds = a.kinds.split(",")
    extra = dict(interpret=True) if a.tiny else {}
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
    bw, sdpa = (None, {}) if a.tiny else torch_ceiling_and_sdpa(configs, a.reps)
    bw_name = "torch copy_"
    if bw is None:
        bw, bw_name = jax_copy_bandwidth(a.tiny), "jax uint32 xor (no torch/CUDA)"
    print(f"copy bandwidth ({bw_name}, read+write): {bw / 1e9:.1f} GB/s", flush=True)
    out = os.path.join(os.environ.get("OUT", "benchmarks/results"), "decode.json")
    rep = Report(out, bw, bw_name)
    for b, t in configs:
        dense_bytes = b * HKV * t * D * 4
        if (b, t) in sdpa:
            name, s = sdpa[(b, t)]
            rep.add(b, t, name, {}, s, dense_bytes)

    def measure(b, t, kind, cfgs, inputs):
        fn, args_list, nbytes, ideal, ref = inputs
        q = rand(jax.random.PRNGKey(b + t), (b, HQ, D))
        want = jax.jit(ref)(q, *args_list[0])
        for cfg in cfgs:
            probe = cfg.get("count0", False)  # empty selections: the output must be all zeros
            try:
                kw = dict(cfg, **({} if kind == "jaxnn" else extra))
                s, got = timed(lambda q, *x: fn(q, *x, **kw), args_list, q,
                               2 if a.tiny else a.reps, 1 if a.tiny else 3)
                got = got.astype(jnp.float32)
                err = float(jnp.abs(got).max()) if probe else relerr(got, want.astype(jnp.float32))
            except Exception as e:
                print(f"  {kind} {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                s, err = float("nan"), None
            name = "ours_" + kind if kind != "jaxnn" else f"jax_nn_dpa_{cfg.get('implementation', 'xla')}"
            name += "_empty_probe" if probe else ""
            rep.add(b, t, name, cfg, s, nbytes,
                    ideal if kind not in ("bf16", "jaxnn") and not probe else None, err)

    # phase 1: defaults (and jax.nn) at every shape; phase 2: sweeps at every shape, by budget
    for b, t in configs:
        key = jax.random.PRNGKey(b * 7 + t)
        inp = make_inputs(b, t, "jaxnn", key)
        measure(b, t, "jaxnn", [{} if a.tiny else dict(implementation="cudnn")], inp)
        if rep.rows[-1]["us"] != rep.rows[-1]["us"]:  # cuDNN refused: XLA's implementation
            measure(b, t, "jaxnn", [{}], inp)
        del inp
        for kind in kinds:
            measure(b, t, kind, sweeps(b)[kind][:PHASE1[kind]], make_inputs(b, t, kind, key))
    for b, t in configs:
        key = jax.random.PRNGKey(b * 7 + t)
        for kind in kinds:
            if a.tiny or time.time() - start > a.budget_s:
                continue
            inp = make_inputs(b, t, kind, key)
            for cfg in sweeps(b)[kind][PHASE1[kind]:]:
                if time.time() - start > a.budget_s:
                    print(f"  budget reached: skipping the rest of the {b}x{t} {kind} sweep", flush=True)
                    break
                measure(b, t, kind, [cfg], inp)
            del inp
    print("\nbest per shape and kernel (vs bf16 = our best bf16 of the shape / this):")
    print("| batch | ctx | kernel | config | us | GB/s | x copy | vs bf16 | of ideal | rel.err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    seen = {}
    for r in rep.rows:
        k = (r["batch"], r["ctx"], r["kernel"])
        if r["us"] == r["us"] and (k not in seen or r["us"] < seen[k]["us"]):
            seen[k] = r
    for r in seen.values():
        f = lambda x, s: "-" if x is None else format(x, s)
        print(f"| {r['batch']} | {r['ctx']} | {r['kernel']} | {json.dumps(r['config'])} | {r['us']:.1f} | "
              f"{r['gbps']:.0f} | {r['x_copy']:.2f} | {f(r['vs_bf16'], '.2f')} | {f(r.get('of_ideal'), '.2f')} | "
              f"{f(r['relerr'], '.1e')} |")
    print(f"total {time.time() - start:.0f} s; json: {out}")


if __name__ == "__main__":
    main()
