"""Block-sparse prefill benchmark (GPU): the sparse-prefill methods end to end (block-mask builder +
kernel) and the kernel at fixed densities, next to dense flash, cuDNN, torch SDPA and torch copy_.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/sparse_prefill.py 2>&1 | tee log
    PYTHONPATH=. python benchmarks/sparse_prefill.py --smoke       # CPU smoke test (tiny, interpret mode)

Plain causal prefill of T tokens (batch 1, starts 0, lengths T), Llama-3-8B attention (32 query
heads, 8 kv heads, head_dim 128), bf16, T in --lengths (default 8192, 32768), block-sparse
densities --densities (default 0.25, 0.1). --smoke (alias --tiny): 4 / 2 heads, d 32, block 16,
float32, T 96 and 160, every kernel interpreted on CPU. Rows:
* `copy` -- torch `Tensor.copy_` of a 1 GiB bf16 buffer: the memory-bandwidth ceiling (GB/s), once.
* `flash` -- our dense `pallas_kernels.gpu.flash_prefill` (default tiles).
* `cudnn` -- `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`.
* `torch_sdpa` -- `torch.nn.functional.scaled_dot_product_attention(is_causal=True,
  enable_gqa=True)` on the same arrays (DLPack), when torch sees a GPU.
* `bsp@D` -- `pallas_kernels.gpu.block_sparse_prefill` (block 128) with random causal block lists
  of density D (fraction of the causal blocks listed: every diagonal block plus a uniform random
  subset of the earlier ones; D = 1 is the full causal list). `ratio` = time / (D x flash time):
  the issue's target is <= 1.15.
* `bsp+cols@D` -- the same lists plus the vertical column-gather form: --columns single key
  columns (MInference's vertical lines; default 1000, 8 with --smoke) drawn uniformly from the
  causal range, listed for every query block (the kernel skips those inside listed blocks).
  `cols_over_bsp` = its time / the `bsp@D` time.
* `lists@D` (with --lists) -- the list preparation inside the wrapper alone (`block_lists.normalize`
  + `loop_bounds`: sort, dedup, loop positions), the per-call overhead beyond the kernel.
* `<method>` -- a `kvjax.sparse_prefill` method on the same q/k/v: `build_ms` = its block-mask
  builder + list conversion alone (the estimation overhead), `e2e_ms` = builder + kernel in one jit,
  `density` = listed / causal blocks it chose (+ unlisted vertical columns / block size), `speedup_vs_cudnn` = cudnn ms / e2e ms,
  `e2e_over_density_x_flash`. Methods: FlexPrefill (gamma 0.9, tau 0.1, min_budget 512),
  MInference vertical-slash (1000, 6096, last 64 queries, blocks of 64; verticals as gathered
  columns, and as whole blocks in the `vertical_form=blocks` row) and A-shape (init 128, local
  T/20 and T/7: about 10 % and 30 % of the causal blocks). Random q/k have no attention structure:
  FlexPrefill / MInference densities here are those of random inputs, not of a real model.
Each kernel row is checked first against `reference.block_sparse_prefill` on a slice (kv head 0,
last <= 512 queries) and the relative L2 error printed. Times: median of 3 timings of --reps
calls chained in one jit (torch: CUDA events). A JSON of all rows is rewritten to
$OUT/sparse_prefill.json (or ./sparse_prefill.json) after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

TINY = "--tiny" in sys.argv or "--smoke" in sys.argv
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kvjax.sparse_prefill import make_sparse_prefill  # noqa: E402
from kvjax.sparse_prefill.attend import kernel_lists  # noqa: E402
from pallas_kernels import block_lists, reference  # noqa: E402
from pallas_kernels.gpu.block_sparse_prefill import block_sparse_prefill  # noqa: E402
from pallas_kernels.gpu.flash_prefill import flash_prefill  # noqa: E402

HQ, HKV, D = (4, 2, 32) if TINY else (32, 8, 128)
BS = 16 if TINY else 128
DTYPE = jnp.float32 if TINY else jnp.bfloat16
ROWS: list[dict] = []


def emit(row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    path = os.path.join(os.environ.get("OUT", "."), "sparse_prefill.json")
    with open(path, "w") as f:
        json.dump(ROWS, f, indent=1)


def timed(fn, q, reps, trials=3):
    """Median seconds per call of fn(q) over `reps` calls chained through q in one jit."""
    def chain(q):
        def body(i, q):
            leaf = jax.tree_util.tree_leaves(fn(q))[0]
            return q + (leaf.reshape(-1)[:8].astype(jnp.float32).mean() * 1e-6).astype(q.dtype)
        return jax.lax.fori_loop(0, reps, body, q)

    f = jax.jit(chain)
    jax.block_until_ready(f(q))
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q))
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts)


def random_lists(rng, t, density):
    """[1, HKV, nb, nb] causal lists: the diagonal + each earlier block with probability p chosen
    so that the listed fraction of the nb (nb + 1) / 2 causal blocks is `density`."""
    nb = -(-t // BS)
    causal = nb * (nb + 1) / 2
    p = max(0.0, min(1.0, (density * causal - nb) / max(causal - nb, 1)))
    i, j = np.arange(nb)[:, None], np.arange(nb)[None, :]
    keep = (j == i) | ((j < i) & (rng.random((HKV, nb, nb)) < p))
    counts = keep.sum(-1).astype(np.int32)
    m = int(counts.max())
    idx = np.full((HKV, nb, m), nb, np.int32)
    for h in range(HKV):
        for r in range(nb):
            c = np.nonzero(keep[h, r])[0]
            idx[h, r, :len(c)] = c
    real = float(keep.sum() / (HKV * causal))
    return jnp.asarray(idx[None]), jnp.asarray(counts[None]), real


def check(out, q, k, v, st, ln, idx=None, cnt=None, cols=None, ccnt=None):
    """Relative L2 error vs the reference on kv head 0's query heads and the last <= 512 queries."""
    t = q.shape[2]
    w = min(t, 512) // BS * BS or t
    g = HQ // HKV
    qs, ks, vs = q[:, :g, t - w:], k[:, :1], v[:, :1]
    st1, ln1 = st[:, :1], ln[:, :1]
    if idx is None:
        want = reference.flash_prefill(qs, ks, vs, st1, ln1)
    else:
        nqb = idx.shape[2]
        cw = {} if cols is None else dict(column_indices=cols[:, :1, nqb - w // BS:],
                                          column_counts=ccnt[:, :1, nqb - w // BS:])
        want = reference.block_sparse_prefill(qs, ks, vs, st1, ln1, idx[:, :1, nqb - w // BS:],
                                              cnt[:, :1, nqb - w // BS:], block_size=BS, **cw)
    got, want = np.asarray(out[:, :g, t - w:], np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def torch_row(q, k, v, reps):
    try:
        import torch
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    f = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            f()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(ts)


def copy_row():
    """torch copy_ bandwidth of a 1 GiB bf16 buffer (read + write), GB/s."""
    try:
        import torch
        if not torch.cuda.is_available():
            return
    except ImportError:
        return
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3 / 10)
    sec = statistics.median(ts)
    emit(dict(row="copy", gbps=2 * a.numel() * 2 / sec / 1e9))
    del a, b


def method_specs(t):
    if TINY:
        return ("block_sparse:flexprefill:block_size=16,min_budget=16",
                "block_sparse:minference:block_size=16,vertical=8,slash=16,last_q=16",
                "block_sparse:minference:block_size=16,vertical=8,slash=16,last_q=16,vertical_form=blocks",
                f"block_sparse:a_shape:block_size=16,vertical=16,slash={t // 4}")
    return ("block_sparse:flexprefill", "block_sparse:minference", "block_sparse:minference:vertical_form=blocks",
            f"block_sparse:a_shape:slash={t // 20}", f"block_sparse:a_shape:slash={t // 7}")


def bench_methods(t, q, k, v, st, ln, reps, flash_s, cudnn_s):
    from pallas_kernels.gpu.block_sparse_prefill import block_sparse_prefill as kernel
    interp = dict(interpret=True) if TINY else {}
    for spec in method_specs(t):
        m = make_sparse_prefill(spec)
        try:
            build = lambda q: kernel_lists(m, q, k, st, ln, 0, D ** -0.5)[:3]
            dc = np.asarray(jax.jit(lambda q: kernel_lists(m, q, k, st, ln, 0, D ** -0.5)[3])(q), np.float64)
            dens = float(dc[..., 0].sum() / dc[..., 1].sum())

            def e2e(q):
                idx, cnt, cols = build(q)
                return kernel(q, k, v, st, ln, idx, cnt, block_size=m.block_size, **cols, **interp)
            out = e2e(q)
            idx, cnt, cols = build(q)
            mb, g = m.block_size, HQ // HKV           # check the last query block of kv head 0
            last = {name: c[:, :1, -1:] for name, c in cols.items()}
            want = reference.block_sparse_prefill(q[:, :g, -mb:], k[:, :1], v[:, :1], st[:, :1], ln[:, :1],
                                                  idx[:, :1, -1:], cnt[:, :1, -1:], block_size=mb, **last)
            got, want = np.asarray(out[:, :g, -mb:], np.float64), np.asarray(want, np.float64)
            err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            sb = timed(build, q, reps)
            se = timed(e2e, q, reps)
            row = dict(T=t, row=spec.split(":", 1)[1], density=dens, build_ms=sb * 1e3, e2e_ms=se * 1e3,
                       build_fraction=sb / se, e2e_over_density_x_flash=se / (dens * flash_s), relerr_last_block=err)
            if cudnn_s:
                row["speedup_vs_cudnn"] = cudnn_s / se
            emit(row)
        except Exception as e:  # noqa: BLE001
            emit(dict(T=t, row=spec, error=f"{type(e).__name__}: {str(e)[:300]}"))


def random_columns(rng, t, n):
    """[1, HKV, nb, n] column lists: n slots per kv head drawn from [0, t), the same for every
    query block (the kernel masks the causal ones away per row)."""
    nb = -(-t // BS)
    cols = np.sort(rng.choice(t, size=(HKV, min(n, t)), replace=True), -1).astype(np.int32)
    cols = np.broadcast_to(cols[None, :, None, :], (1, HKV, nb, cols.shape[-1]))
    return jnp.asarray(cols), jnp.full((1, HKV, nb), cols.shape[-1], jnp.int32)


def bench(t, densities, reps, rng, lists=False, n_columns=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(kq, (1, HQ, t, D), DTYPE)
    k = jax.random.normal(kk, (1, HKV, t, D), DTYPE)
    v = jax.random.normal(kv, (1, HKV, t, D), DTYPE)
    st = jnp.zeros((1, HKV), jnp.int32)
    ln = jnp.full((1, HKV), t, jnp.int32)
    flops = 4 * HQ * D * t * (t + 1) / 2
    interp = dict(interpret=True) if TINY else {}
    dense = lambda q: flash_prefill(q, k, v, st, ln, **interp)
    err = check(dense(q), q, k, v, st, ln)
    sec = timed(dense, q, reps)
    emit(dict(T=t, row="flash", ms=sec * 1e3, tflops=flops / sec / 1e12, relerr=err))
    cudnn_s = None
    if not TINY:
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        cud = lambda qt: jax.nn.dot_product_attention(qt, kt, vt, is_causal=True, implementation="cudnn")
        try:
            s2 = timed(cud, qt, reps)
            emit(dict(T=t, row="cudnn", ms=s2 * 1e3, tflops=flops / s2 / 1e12, flash_over_cudnn=sec / s2))
            cudnn_s = s2
        except Exception as e:  # noqa: BLE001
            emit(dict(T=t, row="cudnn", error=str(e)[:200]))
        s3 = torch_row(q, k, v, reps)
        if s3 is not None:
            emit(dict(T=t, row="torch_sdpa", ms=s3 * 1e3, tflops=flops / s3 / 1e12, flash_over_torch=sec / s3))
    bench_methods(t, q, k, v, st, ln, reps, sec, cudnn_s)
    nkb = -(-t // BS)
    for dens in densities:
        idx, cnt, real = random_lists(rng, t, dens)
        f = lambda q: block_sparse_prefill(q, k, v, st, ln, idx, cnt, block_size=BS, **interp)
        err = check(f(q), q, k, v, st, ln, idx, cnt)
        s = timed(f, q, reps)
        emit(dict(T=t, row=f"bsp@{dens}", density=real, ms=s * 1e3, relerr=err,
                  ratio_to_density_x_flash=s / (real * sec),
                  **({"speedup_vs_cudnn": cudnn_s / s} if cudnn_s else {})))
        if n_columns:
            cols, ccnt = random_columns(rng, t, n_columns)
            fc = lambda q: block_sparse_prefill(q, k, v, st, ln, idx, cnt, block_size=BS, column_indices=cols,
                                                column_counts=ccnt, **interp)
            err = check(fc(q), q, k, v, st, ln, idx, cnt, cols, ccnt)
            sc = timed(fc, q, reps)
            emit(dict(T=t, row=f"bsp+cols@{dens}", density=real, columns=int(cols.shape[-1]), ms=sc * 1e3,
                      relerr=err, cols_over_bsp=sc / s))
        if not lists:
            continue
        width = 1 << max(0, (idx.shape[-1] - 1).bit_length())
        prep = lambda q: q + 0 * block_lists.loop_bounds(
            block_lists.normalize(idx, cnt, nkb, width), st, ln, t, BS, 32).sum().astype(q.dtype)
        sp = timed(prep, q, reps)
        emit(dict(T=t, row=f"lists@{dens}", ms=sp * 1e3, fraction_of_kernel=sp / s))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", "--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--lengths", default="96,160" if TINY else "8192,32768")
    ap.add_argument("--densities", default="0.25,0.1")
    ap.add_argument("--columns", type=int, default=8 if TINY else 1000,
                    help="vertical columns per kv head for the bsp+cols rows (0: none)")
    ap.add_argument("--lists", action="store_true", help="also time the list preparation alone")
    ap.add_argument("--reps", type=int, default=1 if TINY else 3)
    a = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; Hq {HQ} Hkv {HKV} d {D} block {BS}")
    rng = np.random.default_rng(0)
    copy_row()
    for t in (int(x) for x in a.lengths.split(",")):
        bench(t, [float(x) for x in a.densities.split(",")], a.reps, rng, a.lists, a.columns)


if __name__ == "__main__":
    main()
