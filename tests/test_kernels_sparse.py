"""Token- and page-sparse decode: GPU kernel (interpret), TPU kernel (TPU interpret), reference
and the dispatcher vs a float64 numpy oracle written here; Triton lowering of page mode.

Each case has four (batch, kv-head) rows: an empty selection (zeros, no NaN), duplicate pages and
the partial last page of a capacity that is not a multiple of the page size, `lengths` cutting a
page (and a page wholly past it), and out-of-range indices (clamped) with unused entries past
`counts`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels.gpu.sparse_decode import sparse_decode as gpu_sparse
from pallas_kernels.tpu.sparse_decode import sparse_decode as tpu_sparse

B, HKV, CAP, D = 2, 2, 100, 32
TOL = 2e-2


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _case(g: int, p: int, seed: int = 0, cut: bool = True):
    """Inputs (jnp) and the float64 numpy expectation [B, HKV*g, D]; cut=False: lengths = CAP."""
    rng = np.random.default_rng(seed + 10 * p + g)
    npg = -(-CAP // p)
    n = 40 if p == 1 else 6
    idx = rng.integers(0, npg, (B, HKV, n))
    cut_, cut = cut, min(2, npg - 2)  # the page that lengths cuts
    idx[0, 1, :5] = [npg - 1, 0, 0, 1, npg - 1]  # duplicates, partial last page
    idx[1, 0, :2] = [cut, cut + 1]  # cut page, then a page wholly past lengths
    idx[1, 1, :2] = [npg + 3, -1]  # clamped to the last page and to page 0
    idx[1, 1, -1] = 10 ** 6  # past counts: ignored
    counts = np.array([[0, n], [n - 2, n - 1]])
    lengths = np.array([[CAP, CAP], [cut * p + p // 2 + 1 if cut_ else CAP, CAP]])
    q = rng.standard_normal((B, HKV * g, D))
    k = rng.standard_normal((B, HKV, CAP, D))
    v = rng.standard_normal((B, HKV, CAP, D))
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    qn, kn, vn = _f64(q), _f64(k), _f64(v)
    want = np.zeros((B, HKV * g, D))
    for b in range(B):
        for h in range(HKV):
            slots = []
            for page in np.clip(idx[b, h, :counts[b, h]], 0, npg - 1):
                slots += [t for t in range(page * p, (page + 1) * p) if t < min(CAP, lengths[b, h])]
            if not slots:
                continue
            for j in range(h * g, (h + 1) * g):
                s = kn[b, h, slots] @ qn[b, j] * D ** -0.5
                w = np.exp(s - s.max())
                want[b, j] = (w / w.sum()) @ vn[b, h, slots]
    args = (q, k, v, jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32),
            jnp.asarray(lengths, jnp.int32))
    return args, want


def _check(got, want, g):
    got = _f64(got)
    assert np.isfinite(got).all()
    assert np.all(got[0, :g] == 0)  # counts 0
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


# (page_size, g, block_k, extra kernel keywords): token mode; 2 pages per step; a page over two
# steps; P not dividing block_k (chunk 32, 8 rows masked); P < 16 (row gather); forced row gather
@pytest.mark.parametrize("p,g,block_k,kw", [
    (1, 1, 16, {}), (16, 3, 32, {"num_splits": 2}), (32, 4, 16, {"num_splits": 4}),
    (24, 1, 32, {}), (4, 3, 16, {}), (16, 4, 32, {"row_gather": True}),
    # fused variant: in-kernel query prep; one split -> normalised output, no combine; 3 splits
    (1, 3, 16, {"fused": True, "num_splits": 1}), (16, 4, 16, {"fused": True, "num_splits": 3}),
])
def test_gpu_sparse_pages_match_numpy(p, g, block_k, kw):
    args, want = _case(g, p)
    _check(gpu_sparse(*args, page_size=p, block_k=block_k, interpret=True, **kw), want, g)


# token rows; 4 pages per step (P | block_k); a page over three steps (40 = 16+16+8);
# P not dividing block_k (24 of 32 buffer rows used)
@pytest.mark.parametrize("p,g,block_k", [(1, 4, 8), (16, 1, 64), (40, 3, 16), (24, 4, 32)])
def test_tpu_sparse_pages_match_numpy(p, g, block_k):
    args, want = _case(g, p)
    _check(tpu_sparse(*args, page_size=p, block_k=block_k, interpret=True), want, g)


@pytest.mark.parametrize("p", [1, 16, 32])
def test_reference_and_dispatch_match_numpy(p):
    args, want = _case(3, p, seed=1)
    _check(reference.sparse_decode(*args, page_size=p), want, 3)
    _check(pallas_kernels.sparse_decode(*args[:5], lengths=args[5], page_size=p, impl="reference"),
           want, 3)


def test_token_mode_without_lengths():
    """page_size 1 and no lengths: the original token-mode contract (every clamped index live)."""
    (q, k, v, idx, counts, _), want = _case(1, 1, cut=False)
    for got in (gpu_sparse(q, k, v, idx, counts, block_k=16, interpret=True),
                tpu_sparse(q, k, v, idx, counts, block_k=8, interpret=True),
                reference.sparse_decode(q, k, v, idx, counts)):
        _check(got, want, 1)


def test_sparse_errors():
    (q, k, v, idx, counts, lengths), _ = _case(1, 16)
    with pytest.raises(ValueError, match="page_size"):
        gpu_sparse(q, k, v, idx, counts, page_size=0, interpret=True)
    with pytest.raises(ValueError, match="page_size"):
        reference.sparse_decode(q, k, v, idx, counts, page_size=2.0)
    with pytest.raises(ValueError, match="lengths"):
        tpu_sparse(q, k, v, idx, counts, lengths[:, :1], page_size=16, interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        gpu_sparse(q, k, v, idx, counts, page_size=16, block_k=24, interpret=True)


def test_page_mode_lowers_to_triton():
    q = jnp.zeros((2, 8, 128), jnp.bfloat16)
    k = jnp.zeros((2, 2, 1000, 128), jnp.bfloat16)
    idx = jnp.zeros((2, 2, 24), jnp.int32)
    cnt = jnp.full((2, 2), 20, jnp.int32)
    for kw in ({"page_size": 16, "block_k": 64}, {"page_size": 64, "block_k": 32},
               {"page_size": 8}, {"page_size": 16, "row_gather": True},
               {"page_size": 64, "fused": True, "num_splits": 1}):
        fn = lambda *a, kw=kw: gpu_sparse(*a, **kw)  # noqa: E731
        try:
            text = jax.jit(fn).trace(q, k, k, idx, cnt, cnt * 16).lower(
                lowering_platforms=("cuda",)).as_text()
        except Exception as e:  # jax >= 0.11 needs a (possibly abstract) GPU device to lower for cuda
            if "No supported GPU devices found" in str(e):
                pytest.skip("this jax cannot lower for cuda without a GPU device (jax >= 0.11)")
            raise
        assert "kvjax_page_sparse_decode" in text and "triton" in text.lower()


def test_tpu_page_mode_lowers_to_mosaic():
    """Mosaic lowering (jaxpr -> Mosaic MLIR, no TPU needed) of page and token mode with lengths."""
    q = jnp.zeros((2, 8, 128), jnp.bfloat16)
    k = jnp.zeros((2, 2, 1000, 128), jnp.bfloat16)
    idx = jnp.zeros((2, 2, 24), jnp.int32)
    cnt = jnp.full((2, 2), 20, jnp.int32)
    for kw in ({"page_size": 16, "block_k": 64}, {"page_size": 40, "block_k": 16}, {}):
        fn = lambda *a, kw=kw: tpu_sparse(*a, **kw)  # noqa: E731
        text = jax.jit(fn).trace(q, k, k, idx, cnt, cnt * 16).lower(
            lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text


def test_zero_width_selection_gives_zeros():
    """indices [batch, kv_heads, 0] (e.g. fewer selected tokens than one page): zeros, no error."""
    q = jnp.ones((1, 4, 32), jnp.float32)
    k = jnp.ones((1, 2, 64, 32), jnp.float32)
    idx, cnt = jnp.zeros((1, 2, 0), jnp.int32), jnp.zeros((1, 2), jnp.int32)
    for out in (reference.sparse_decode(q, k, k, idx, cnt),
                gpu_sparse(q, k, k, idx, cnt, page_size=16, interpret=True),
                tpu_sparse(q, k, k, idx, cnt, interpret=True)):
        assert out.shape == (1, 4, 32) and not np.asarray(out).any()
