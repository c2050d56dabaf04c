"""Decode-attention benchmark (GPU): copy bandwidth, XLA reference, JAX Pallas baselines, our kernels.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/decode.py 2>&1 | tee log   # default set (~10+ min:
                                                   # split it over calls with --configs)
    PYTHONPATH=. python benchmarks/decode.py --kinds dense,kivi4,kivi2,sweep,dsweep   # tuning sweeps at 8x32768
    PYTHONPATH=. python benchmarks/decode.py --quick         # two shapes
    PYTHONPATH=. python benchmarks/decode.py --configs 8x32768,32x32768

Prints one table: per (batch, context) and kernel, time per call (us), TB/s of the bytes the
kernel must read (KV payload incl. scales/residuals/indices), and that rate as a fraction of the
device-to-device copy bandwidth measured in the same run (bytes read + written). Shapes are
Llama-3-8B attention (32 q-heads, 8 kv-heads, head_dim 128), every head full (lengths = context).

Timing: each measurement jits `reps` back-to-back calls chained through the query (so nothing
is hoisted or overlapped), over up to 4 distinct input sets (at least 2x the L2 in total, sized by
each kernel's own bytes), and
takes the median of several such timings divided by reps. Before timing, every kernel is checked
against `pallas_kernels.reference` on a smaller random case (relative error printed).
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference
from pallas_kernels.gpu import dense_decode as _dense, kivi_decode as _kivi, qjl_scores as _qjl
from pallas_kernels.gpu import sparse_decode as _sparse

INTERPRET = "--interpret" in sys.argv  # CPU smoke test of this script (tiny configs only)
dense_decode = functools.partial(_dense.dense_decode, interpret=INTERPRET)
kivi_decode = functools.partial(_kivi.kivi_decode, interpret=INTERPRET)
qjl_scores = functools.partial(_qjl.qjl_scores, interpret=INTERPRET)
sparse_decode = functools.partial(_sparse.sparse_decode, interpret=INTERPRET)

HQ, HKV, D = 32, 8, 128
G, R = 32, 128
L2_BYTES = 60 * 2 ** 20  # H200: 60 MB (H100: 50 MB)
SWEEP_AT = ["8x32768"]  # the config where the tuning sweep runs (--sweep-at; "all" = every config)
KIVI_KW = [0, 0]  # --kivi-gps / --kivi-stages (0 = kernel default)
QJL_AT = ["32x32768"]  # --qjl-at
SPARSE = [(16,), [(64, 64)]]  # --sparse-fracs, --pages P:block_k,...
KIVI_SWEEP = [(4, 4, 3), (4, 8, 2), (8, 4, 2), (8, 8, 3), (4, 4, 4)]  # --kivi-sweep tile_groups:warps:stages,...


def timed(fn, args_list, q, reps, trials=3):
    """Median seconds per call of fn(q, *args) over ~`reps` chained calls cycling through args_list.

    The calls run inside one jitted fori_loop (compiled once), chained through q."""
    outer = max(1, reps // len(args_list))

    def step(q, args):
        out = fn(q, *args).reshape(-1)
        extra = out[: q.size] if out.size >= q.size else jnp.resize(out, (q.size,))
        return q + (extra.reshape(q.shape) * 1e-6).astype(q.dtype)

    def chain(q, all_args):
        def body(i, q):
            for a in all_args:
                q = step(q, a)
            return q
        return jax.lax.fori_loop(0, outer, body, q)

    f = jax.jit(chain)
    jax.block_until_ready(f(q, args_list))
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, args_list))
        ts.append((time.perf_counter() - t0) / (outer * len(args_list)))
    return statistics.median(ts)


def copy_bandwidth(n=20):
    """Device-to-device copy rate (bytes read + written): the best of (a) n chained `a*1.0001+1`
    passes over a 1 GiB bf16 buffer inside one jit and (b) single `a + 1` passes over 2 GiB
    (one launch each, synchronised). Also prints (c) a read-only rate (f32 sum of 4 GiB bf16),
    the closer ceiling for decode, which only reads."""
    def best(f, x, reps=5):
        jax.block_until_ready(f(x))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            ts.append(time.perf_counter() - t0)
        return min(ts)
    sh = 10 if INTERPRET else 0  # CPU smoke test: 1024x smaller buffers
    x = jax.random.normal(jax.random.PRNGKey(7), (2 ** (30 - sh) // 2,), jnp.float32).astype(jnp.bfloat16)
    a = 2 * x.nbytes * n / best(jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda i, a: a * 1.0001 + 1, a)), x)
    del x
    y = jax.random.normal(jax.random.PRNGKey(8), (2 ** (31 - sh) // 2,), jnp.float32).astype(jnp.bfloat16)
    b = 2 * y.nbytes / best(jax.jit(lambda a: a + 1), y, 10)
    del y
    w = jax.random.bits(jax.random.PRNGKey(10), (2 ** (31 - sh) // 4,), jnp.uint32)
    u = 2 * w.nbytes / best(jax.jit(lambda a: a ^ 1), w, 10)
    del w
    z = jax.random.normal(jax.random.PRNGKey(9), (2 ** (32 - sh) // 2,), jnp.float32).astype(jnp.bfloat16)
    c = z.nbytes / best(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), z, 10)
    del z
    print(f"copy (read+write): chained 1 GiB {a / 1e12:.3f} TB/s, single 2 GiB bf16 {b / 1e12:.3f} TB/s, "
          f"single 2 GiB uint32 xor {u / 1e12:.3f} TB/s; read-only sum 4 GiB {c / 1e12:.3f} TB/s", flush=True)
    return max(a, b, u)


def rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def make_kivi(key, b, t, bits):
    ks = jax.random.split(key, 8)
    pk = D * bits // 8
    return dict(
        k_codes=jax.random.randint(ks[0], (b, HKV, t, pk), 0, 256, jnp.int32).astype(jnp.uint8),
        k_scale=(jax.random.uniform(ks[1], (b, HKV, t // G, D)) * 0.2).astype(jnp.float16),
        k_min=rand(ks[2], (b, HKV, t // G, D), jnp.float16),
        v_codes=jax.random.randint(ks[3], (b, HKV, t, pk), 0, 256, jnp.int32).astype(jnp.uint8),
        v_scale=(jax.random.uniform(ks[4], (b, HKV, t, D // G)) * 0.2).astype(jnp.float16),
        v_min=rand(ks[5], (b, HKV, t, D // G), jnp.float16),
        k_resid=rand(ks[6], (b, HKV, R, D), jnp.bfloat16),
        v_resid=rand(ks[7], (b, HKV, R, D), jnp.bfloat16),
    )


KIVI_ORDER = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_resid", "v_resid"]


def kivi_lens(b, total):
    """Lengths of a KIVI cache holding `total` tokens: k_len = total - total % R, v_len = total - R."""
    lengths = jnp.full((b, HKV), total, jnp.int32)
    return lengths - lengths % R, jnp.maximum(lengths - R, 0), lengths


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_all():
    """Kernels vs reference on GPU at a small ragged case; returns list of (name, relerr)."""
    key = jax.random.PRNGKey(1)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    b, t = (2, 256) if INTERPRET else (3, 1024)
    q = rand(k1, (b, HQ, D), jnp.bfloat16)
    k = rand(k2, (b, HKV, t, D), jnp.bfloat16)
    v = rand(k3, (b, HKV, t, D), jnp.bfloat16)
    lens = jax.random.randint(k4, (b, HKV), 0, t + 1).at[0, 0].set(0).at[0, 1].set(1)
    res = [("dense", relerr(dense_decode(q, k, v, lens), reference.dense_decode(q, k, v, lens)))]
    for bits in (4, 2):
        arr = make_kivi(k2, b, t, bits)
        total = jnp.clip(lens + R // 2, 0, t)
        kl, vl, tl = total - total % R, jnp.maximum(total - R, 0), total
        args = [arr[n] for n in KIVI_ORDER] + [kl, vl, tl]
        res.append((f"kivi{bits}", relerr(kivi_decode(q, *args, bits=bits, group_size=G),
                                          reference.kivi_decode(q, *args, bits=bits, group_size=G))))
    idx = jax.random.randint(k4, (b, HKV, 256), 0, t)
    cnt = jnp.minimum(lens, 256)
    res.append(("sparse", relerr(sparse_decode(q, k, v, idx, cnt), reference.sparse_decode(q, k, v, idx, cnt))))
    pidx = jax.random.randint(k4, (b, HKV, 16), 0, t // 16 + 2)  # a few past the end: clamped
    pcnt = jnp.minimum(lens // 8, 16)
    res.append(("sparse_p16", relerr(sparse_decode(q, k, v, pidx, pcnt, lens, page_size=16),
                                     reference.sparse_decode(q, k, v, pidx, pcnt, lens, page_size=16))))
    qa = make_qjl(k3, b, t)
    got = qjl_scores(q, *qa, lens)
    want = reference.qjl_scores(q, *qa, lens)
    valid = (jnp.arange(t)[None, None] < jnp.repeat(lens, HQ // HKV, axis=1)[:, :, None])
    res.append(("qjl-bf16", relerr(jnp.where(valid, got, 0), jnp.where(valid, want, 0))))
    got = qjl_scores(q, *qa, lens, precise=True)
    res.append(("qjl-f32", relerr(jnp.where(valid, got, 0), jnp.where(valid, want, 0))))
    return res


def make_qjl(key, b, t, m=256, m_out=256, n_out=8):
    ks = jax.random.split(key, 6)
    return (jax.random.randint(ks[0], (b, HKV, t, m // 8), 0, 256, jnp.int32).astype(jnp.uint8),
            jax.random.randint(ks[1], (b, HKV, t, m_out // 8), 0, 256, jnp.int32).astype(jnp.uint8),
            (jax.random.uniform(ks[2], (b, HKV, t)) * 10 + 5).astype(jnp.float16),
            (jax.random.uniform(ks[3], (b, HKV, t)) * 4).astype(jnp.float16),
            # distinct outlier channels per group (the layout contract)
            jnp.argsort(jax.random.uniform(ks[4], (b, HKV, t // G, D)), axis=-1)[..., :n_out].astype(jnp.int32),
            jax.random.normal(ks[5], (D, m), jnp.float32))


def n_copies(bytes_read: int) -> int:
    """Distinct input sets to rotate through so that one call's bytes are not served from L2:
    at least 2x the L2 size in total (at most 4 sets)."""
    return max(1, min(4, math.ceil(2 * L2_BYTES / bytes_read)))


def nbytes(*xs):
    return sum(x.size * x.dtype.itemsize for x in xs)


def bench_config(b, t, bw, reps, rows, kinds):
    key = jax.random.PRNGKey(b * 1000003 + t)
    kq, kk, kv = jax.random.split(key, 3)
    q = rand(kq, (b, HQ, D), jnp.bfloat16)
    dense_bytes = b * HKV * t * D * 2 * 2
    copies = n_copies(dense_bytes)
    lens = jnp.full((b, HKV), t, jnp.int32)
    caches = [(rand(jax.random.fold_in(kk, c), (b, HKV, t, D), jnp.bfloat16),
               rand(jax.random.fold_in(kv, c), (b, HKV, t, D), jnp.bfloat16)) for c in range(copies)]

    def add(name, fn, args_list, bytes_read):
        print(f"  .. {name} (compiling + timing; {time.strftime('%H:%M:%S')})", flush=True)
        try:
            s = timed(fn, args_list, q, reps)
            rows.append((b, t, name, s * 1e6, bytes_read / s / 1e12, bytes_read / s / bw))
        except Exception as e:  # keep the table going; the error is printed
            print(f"  {name} b={b} t={t} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            rows.append((b, t, name, float("nan"), float("nan"), float("nan")))
        r = rows[-1]
        print(f"  {r[2]:<22} {r[3]:10.1f} us  {r[4]:6.3f} TB/s  {r[5]:5.2f}x copy", flush=True)

    if "xla" in kinds:
        add("xla_reference", lambda q, k, v: reference.dense_decode(q, k, v, lens),
            caches, dense_bytes)
    if "paged" in kinds:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        page = 16
        pps = t // page

        def to_pages(x):  # [b, h, t, d] -> [h, b*pps, page, d] (done once, outside timing)
            return x.reshape(b, HKV, pps, page, D).transpose(1, 0, 2, 3, 4).reshape(HKV, b * pps, page, D)
        paged = [(to_pages(k), to_pages(v)) for k, v in caches]
        tables = jnp.arange(b * pps, dtype=jnp.int32).reshape(b, pps)
        add("jax_paged_attention", lambda q, k, v: paged_attention(q, k, v, tables, lens[:, 0], interpret=INTERPRET),
            paged, dense_bytes)
    if "gqa" in kinds:
        from jax.experimental.pallas.ops.gpu import decode_attention
        tok_major = [(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) for k, v in caches]
        add("jax_decode_gqa", lambda q, k, v: decode_attention.gqa(q, k, v, kv_seq_len=lens[:, 0], interpret=INTERPRET),
            tok_major, dense_bytes)
    if "dense" in kinds:
        add("ours_dense_bf16", lambda q, k, v: dense_decode(q, k, v, lens), caches, dense_bytes)
    sweep = "sweep" in kinds and SWEEP_AT[0] in ("all", f"{b}x{t}")
    if sweep and "dsweep" in kinds:
        add("ours_dense_bf16 (again)", lambda q, k, v: dense_decode(q, k, v, lens), caches, dense_bytes)
        for bk, nw, ns in [(64, 4, 2), (64, 4, 4), (128, 4, 2), (128, 8, 3), (32, 4, 4)]:
            add(f"dense_bk{bk}_w{nw}_s{ns}",
                lambda q, k, v, bk=bk, nw=nw, ns=ns: dense_decode(q, k, v, lens, block_k=bk, num_warps=nw, num_stages=ns),
                caches, dense_bytes)
        for sp in (2, 4, 8, 16):
            add(f"dense_splits{sp}", lambda q, k, v, sp=sp: dense_decode(q, k, v, lens, num_splits=sp),
                caches, dense_bytes)
    del caches
    for bits in (4, 2):
        if f"kivi{bits}" not in kinds:
            continue
        # KIVI reads ~3-5x fewer bytes than bf16: size the rotation by its own bytes
        kcopies = n_copies(b * HKV * t * (2 * D * bits // 8 + 32))
        arrs = [make_kivi(jax.random.fold_in(kk, 100 + c + bits), b, t, bits) for c in range(kcopies)]
        kl, vl, tl = kivi_lens(b, t)
        args_list = [[a[n] for n in KIVI_ORDER] + [kl, vl, tl] for a in arrs]
        # bytes read: all codes/scales/mins + the live residual rows (V window R, K tail 0 here)
        kbytes = nbytes(*[arrs[0][n] for n in KIVI_ORDER[:6]]) + b * HKV * R * D * 2
        kw = {k: v for k, v in (("tile_groups", KIVI_KW[0]), ("num_stages", KIVI_KW[1])) if v}
        add(f"ours_kivi{bits}", lambda q, *a, bits=bits: kivi_decode(q, *a, bits=bits, group_size=G, **kw),
            args_list, kbytes)
        if "kivi_fused" in kinds:  # one key and one value dot per tile (fields joined in registers)
            add(f"kivi{bits}_fused", lambda q, *a, bits=bits: kivi_decode(
                q, *a, bits=bits, group_size=G, fuse_fields=True, **kw), args_list, kbytes)
        if sweep and (bits == 4 or "sweep2" in kinds):
            for gps, nw, ns in KIVI_SWEEP:
                add(f"kivi{bits}_gps{gps}_w{nw}_s{ns}", lambda q, *a, bits=bits, nw=nw, ns=ns, gps=gps: kivi_decode(
                    q, *a, bits=bits, group_size=G, num_warps=nw, num_stages=ns, tile_groups=gps),
                    args_list, kbytes)
        del arrs, args_list
    if "sparse" in kinds:
        for frac in SPARSE[0]:  # 1/16 of 32K = 2K selected (the sparse target)
            n = t // frac
            caches = [(rand(jax.random.fold_in(kk, c), (b, HKV, t, D), jnp.bfloat16),
                       rand(jax.random.fold_in(kv, c), (b, HKV, t, D), jnp.bfloat16))
                      for c in range(n_copies(b * HKV * n * D * 2 * 2))]  # by the selected bytes
            idx = jnp.sort(jax.random.permutation(kk, t)[:n]).astype(jnp.int32)
            idx = jnp.broadcast_to(idx, (b, HKV, n))
            cnt = jnp.full((b, HKV), n, jnp.int32)
            add(f"ours_sparse_1/{frac}", lambda q, k, v: sparse_decode(q, k, v, idx, cnt),
                caches, b * HKV * n * (D * 2 * 2 + 4))
            for P, bk in SPARSE[1]:  # page mode, page_size P, block_k
                npg = n // P
                if npg == 0:
                    continue
                pidx = jnp.sort(jax.random.permutation(kv, t // P)[:npg]).astype(jnp.int32)
                pidx = jnp.broadcast_to(pidx, (b, HKV, npg))
                pcnt = jnp.full((b, HKV), npg, jnp.int32)
                add(f"ours_sparse_p{P}_bk{bk}_1/{frac}",
                    lambda q, k, v, pidx=pidx, pcnt=pcnt, P=P, bk=bk: sparse_decode(
                        q, k, v, pidx, pcnt, page_size=P, block_k=bk),
                    caches, b * HKV * (n * D * 2 * 2 + npg * 4))
            del caches
    if "qjl" in kinds and QJL_AT[0] in ("all", f"{b}x{t}"):  # ~100 s of Triton compile per shape
        qa = [make_qjl(jax.random.fold_in(kk, 200 + c), b, t) for c in range(n_copies(b * HKV * t * 68))]
        add("ours_qjl_scores", lambda q, *a: qjl_scores(q, *a, lens), [list(x) for x in qa],
            nbytes(*qa[0][:5]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="8x32768,32x32768,8x131072,1x131072,32x4096,1x4096",
                    help="comma list of BATCHxCONTEXT")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="xla,paged,gqa,dense,kivi4,kivi2,sparse,qjl")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke test (interpret mode)")
    ap.add_argument("--sweep-at", default="8x32768")
    ap.add_argument("--kivi-gps", type=int, default=0, help="KIVI tile_groups (0: kernel default)")
    ap.add_argument("--kivi-stages", type=int, default=0, help="KIVI num_stages (0: kernel default)")
    ap.add_argument("--kivi-sweep", default="", help="KIVI sweep points gps:warps:stages,... "
                    "(kinds 'sweep' times them for 4-bit, 'sweep2' also for 2-bit)")
    ap.add_argument("--sparse-fracs", default="16", help="selected fraction denominators")
    ap.add_argument("--pages", default="64:64", help="page mode page_size:block_k,...")
    ap.add_argument("--qjl-at", default="32x32768", help="config where QJL runs ('all' = every one)")
    a = ap.parse_args()
    QJL_AT[0] = a.qjl_at
    SPARSE[0] = tuple(int(x) for x in a.sparse_fracs.split(","))
    SPARSE[1] = [tuple(int(x) for x in it.split(":")) for it in a.pages.split(",") if it]
    SWEEP_AT[0] = a.sweep_at
    KIVI_KW[:] = [a.kivi_gps, a.kivi_stages]
    if a.kivi_sweep:
        KIVI_SWEEP[:] = [tuple(int(x) for x in item.split(":")) for item in a.kivi_sweep.split(",")]
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}", flush=True)
    if not a.no_check:
        for name, e in check_all():
            print(f"check {name:<8} rel.err vs reference {e:.2e} {'OK' if e < 2e-2 else 'FAIL'}", flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth (read+write): {bw / 1e12:.3f} TB/s", flush=True)
    configs = "1x32768,8x32768" if a.quick else a.configs
    kinds = set(a.kinds.split(","))
    rows = []
    for c in configs.split(","):
        b, t = (int(x) for x in c.split("x"))
        print(f"batch {b} context {t}", flush=True)
        bench_config(b, t, bw, a.reps, rows, kinds)
    print(f"\n| batch | context | kernel | us/call | TB/s | x copy BW ({bw / 1e12:.2f} TB/s) |")
    print("|---|---|---|---|---|---|")
    for b, t, name, us, tbs, frac in rows:
        print(f"| {b} | {t} | {name} | {us:.1f} | {tbs:.3f} | {frac:.2f} |")
    dense = {(b, t): us for b, t, n, us, _, _ in rows if n == "ours_dense_bf16"}
    print("\nspeedups vs ours_dense_bf16 (sparse: also as a fraction of the ideal context/selected):")
    for b, t, name, us, _, _ in rows:
        if (b, t) in dense and name.startswith("ours_") and name != "ours_dense_bf16":
            sp = dense[(b, t)] / us
            extra = ""
            if name.startswith("ours_sparse") and "_1/" in name:
                ideal = int(name.rsplit("/", 1)[1])
                extra = f" = {sp / ideal:.2f} of the ideal {ideal}x"
            print(f"  b={b} t={t} {name}: {sp:.2f}x{extra}")
    print("\ntargets:")
    for b, t, name, us, tbs, frac in rows:
        if name == "ours_dense_bf16" and b * HKV >= 64 and t >= 32768:
            print(f"  bf16 b={b} t={t}: {frac:.2f}x copy BW (target >= 0.85)")
        if name in ("ours_kivi4", "ours_kivi2") and t >= 32768 and (b, t) in dense:
            want = 2.5 if name == "ours_kivi4" else 4.0
            print(f"  {name[5:]} b={b} t={t}: {dense[(b, t)] / us:.2f}x faster than bf16 (target >= {want})")


if __name__ == "__main__":
    main()
