"""NSA selected-block attention kernels (GPU Pallas-Triton, TPU Pallas-Mosaic) in interpret mode
against the jnp reference `models.nsa.selected_attention` (itself checked against float64 numpy
in test_nsa.py), their lowering, and their input errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.nsa import (NSAConfig, masked_attention, select_blocks, selected_attention, window_blocks,
                        window_mask)
from pallas_kernels.gpu.nsa_select import nsa_select as gpu_select
from pallas_kernels.tpu.nsa_select import nsa_select as tpu_select

CFG = NSAConfig(kernel_size=16, kernel_stride=8, block_size=16, top_n=3, init_blocks=1, local_blocks=1)


def _case(T=53, hkv=2, g=3, d=16, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(1, hkv * g, T, d)), dtype)
    k = jnp.asarray(r.normal(size=(1, hkv, T, d)), dtype)
    v = jnp.asarray(r.normal(size=(1, hkv, T, d)), dtype)
    scores = jnp.asarray(r.random(size=(1, hkv, T, CFG.n_selection_blocks(T))), jnp.float32)
    idx, counts = select_blocks(scores, jnp.arange(T), CFG)
    return q, k, v, idx, counts


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_selection_kernel_matches_reference(impl):
    q, k, v, idx, counts = _case()                      # 53 tokens: 4 blocks, the last one partial
    assert (np.asarray(counts) == 3).any() and (np.asarray(counts) < 3).any()
    want = np.asarray(selected_attention(q, k, v, idx, 16, 0.3))
    fn = gpu_select if impl == "gpu" else tpu_select
    got = np.asarray(fn(q, k, v, idx, counts, block_size=16, scale=0.3, interpret=True))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-5, err
    if impl == "tpu":
        return
    # bfloat16 inputs: compared with the reference on the same (rounded) inputs
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    want = np.asarray(selected_attention(qb, kb, vb, idx, 16, 0.3))
    got = np.asarray(fn(qb, kb, vb, idx, counts, block_size=16, scale=0.3, interpret=True), np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2


def test_selection_kernels_lower():
    q = jnp.zeros((1, 12, 256, 128), jnp.bfloat16)
    k = jnp.zeros((1, 4, 256, 128), jnp.bfloat16)
    idx = jnp.zeros((1, 4, 256, 16), jnp.int32)
    counts = jnp.full((1, 4, 256), 3, jnp.int32)
    try:
        text = jax.jit(lambda *a: gpu_select(*a, block_size=64)).trace(q, k, k, idx, counts).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()
    except Exception as e:  # jax >= 0.11 needs a GPU device to lower for cuda
        if "No supported GPU devices found" not in str(e):
            raise
    from pallas_kernels.tpu.nsa_select_fsa import nsa_select_block_outer as tpu_block_outer
    for fn in (tpu_select, tpu_block_outer):
        text = jax.jit(lambda *a: fn(*a, block_size=64)).trace(q, k, k, idx, counts).lower(
            lowering_platforms=("tpu",)).as_text()
        assert "tpu_custom_call" in text
    # FSA's block-outer forward and the compressed-branch kernel (GPU)
    from pallas_kernels.gpu.nsa_compress import nsa_compressed
    from pallas_kernels.gpu.nsa_select_fsa import nsa_select_block_outer
    ck = jnp.zeros((1, 4, 15, 128), jnp.bfloat16)
    for fn, args in ((lambda *a: nsa_select_block_outer(*a, block_size=64), (q, k, k, idx, counts)),
                     (lambda *a: nsa_compressed(*a), (q, ck, ck))):
        try:
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "triton" in text.lower()
        except Exception as e:  # jax >= 0.11 needs a GPU device to lower for cuda
            if "No supported GPU devices found" not in str(e):
                raise
    # the backward (fwd with lse + dq + dk/dv kernels: three custom calls) at Llama-like shapes
    from pallas_kernels.gpu.nsa_select_bwd import nsa_select_trainable as gpu_op
    from pallas_kernels.tpu.nsa_select_bwd import nsa_select_trainable as tpu_op
    for op, platform, marker in ((tpu_op, "tpu", "tpu_custom_call"), (gpu_op, "cuda", "triton")):
        loss = lambda q, k, v: jnp.sum(op(q, k, v, idx, counts, 64, None, 64, False, 512).astype(jnp.float32))
        try:
            text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
        except Exception as e:  # jax >= 0.11 needs a GPU device to lower for cuda
            if "No supported GPU devices found" not in str(e):
                raise
            continue
        assert text.lower().count(marker) >= 3, platform


def test_selection_kernel_errors():
    q, k, v, idx, counts = _case(T=20)
    with pytest.raises(ValueError, match="power of two"):
        gpu_select(q, k, v, idx, counts, block_size=24)
    with pytest.raises(ValueError, match="multiple of 8"):
        tpu_select(q, k, v, idx, counts, block_size=12)
    with pytest.raises(ValueError, match="indices must be"):
        gpu_select(q, k, v, idx[:, :1], counts, block_size=16)
    with pytest.raises(ValueError, match="does not divide"):
        gpu_select(q[:, :5], k, v, idx, counts, block_size=16)
    with pytest.raises(ValueError, match="counts must be"):
        tpu_select(q, k, v, idx, counts[..., :3], block_size=16)
    from pallas_kernels.gpu.nsa_select_bwd import nsa_select_bwd as gpu_bwd
    from pallas_kernels.tpu.nsa_select_bwd import nsa_select_bwd as tpu_bwd
    lse = jnp.zeros(q.shape[:3], jnp.float32)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        gpu_bwd(q, k, v, idx, counts, q, lse, q, block_size=16, block_q=24)
    with pytest.raises(ValueError, match="multiples of 8"):
        tpu_bwd(q, k, v, idx, counts, q, lse, q, block_size=16, block_q=12)
    with pytest.raises(ValueError, match="indices must be"):
        tpu_bwd(q, k, v, idx[:, :1], counts, q, lse, q, block_size=16)


BWD = NSAConfig(kernel_size=16, kernel_stride=8, block_size=16, top_n=2, init_blocks=1, local_blocks=1)


def _bwd_case(seed):
    """GQA 3 over 1 kv head, 37 tokens, head_dim 16, top-2 of 3 blocks of 16."""
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(1, h, 37, 16)), jnp.float32) for h in (3, 1, 1))
    idx, counts = select_blocks(jnp.asarray(r.random(size=(1, 1, 37, 3)), jnp.float32), jnp.arange(37), BWD)
    return q, k, v, idx, counts


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_selection_backward_matches_grad_of_reference(impl):
    """custom_vjp (kernel forward + dq / dk-dv kernels) vs jax.grad of the jnp reference, at an
    odd length (37: last key block and last query tile partial), GQA 3, top-2 of 3 blocks (tokens
    of block 2 skip block 1), random cotangents; in the same loss the sliding-window use (window
    20 over `window_blocks` + the kernels' window bound) vs the [T, T] window mask."""
    from train.nsa import select_fn_for
    if impl == "gpu":    # through train.nsa's --attention interpret hook (the GPU kernels interpreted)
        hook = select_fn_for("interpret", block_q=16)
        op = lambda q, k, v, idx, counts, bs, scale, bq, interp, window: hook(q, k, v, idx, counts, bs, scale, window)
    else:
        from pallas_kernels.tpu.nsa_select_bwd import nsa_select_trainable as op
    with pytest.raises(ValueError, match="attention must be"):
        select_fn_for("cuda")
    q, k, v, idx, counts = _bwd_case(5)
    assert not (np.asarray(idx)[0, 0, 32:] == 1).any()
    w, w2 = (jnp.asarray(x, jnp.float32) for x in np.random.default_rng(6).normal(size=(2,) + q.shape))
    widx, wcnt = window_blocks(37, 20, 16)
    widx, wcnt = jnp.broadcast_to(jnp.asarray(widx), (1, 1, 37, 3)), jnp.broadcast_to(jnp.asarray(wcnt), (1, 1, 37))
    assert (np.asarray(wcnt) == 2).any() and (np.asarray(wcnt) == 1).any()

    def ref(q, k, v):
        win = masked_attention(q, k, v, window_mask(37, 20)[None, None], 0.25)[0]
        return jnp.sum(selected_attention(q, k, v, idx, 16, 0.25) * w) + jnp.sum(win * w2)

    def ker(q, k, v):
        sel = op(q, k, v, idx, counts, 16, 0.25, 16, True, 0).astype(jnp.float32)
        win = op(q, k, v, widx, wcnt, 16, 0.25, 16, True, 20).astype(jnp.float32)
        return jnp.sum(sel * w) + jnp.sum(win * w2)
    want_val, want = jax.jit(jax.value_and_grad(ref, (0, 1, 2)))(q, k, v)
    got_val, got = jax.jit(jax.value_and_grad(ker, (0, 1, 2)))(q, k, v)
    assert abs(float(got_val - want_val)) < 1e-5 * float(jnp.abs(w).sum() + jnp.abs(w2).sum())
    for name, a, b in zip("qkv", got, want):
        err = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_block_outer_forward_matches_reference(impl, g=3):
    """FSA's block-outer forward, GPU and TPU kernels (worklist of per-block token chunks, one
    [block_q, block] dot per head, online merge over a token's blocks) vs the jnp reference at an odd length (53: the last
    key block partial, chunks padded), GQA group 3 (SmolLM2's), 2 kv heads, top-3 with
    counts < 3 and -1 entries; the lse against the reference's log-sum-exp; the window bound
    (window 20 over `window_blocks`) against the [T, T] window mask."""
    if impl == "gpu":
        from pallas_kernels.gpu.nsa_select_fsa import nsa_select_block_outer
    else:
        from pallas_kernels.tpu.nsa_select_fsa import nsa_select_block_outer
    T, hkv, d, scale = 53, 2, 16, 0.3
    r = np.random.default_rng(g)
    q, k, v = (jnp.asarray(r.normal(size=(1, h, T, d)), jnp.float32) for h in (hkv * g, hkv, hkv))
    idx, counts = select_blocks(jnp.asarray(r.random(size=(1, hkv, T, 4)), jnp.float32), jnp.arange(T), CFG)
    assert (np.asarray(counts) < 3).any() and (np.asarray(idx) == -1).any()
    got, lse = nsa_select_block_outer(q, k, v, idx, counts, block_size=16, scale=scale, block_q=16,
                                      interpret=True, return_lse=True, window=0)
    want = np.asarray(selected_attention(q, k, v, idx, 16, scale))
    assert np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want) < 1e-5
    # lse (base 2 on GPU, natural on TPU) = log sum over the selected causal keys of exp(scale * q.k)
    from models.nsa import selected_mask, _grouped_logits
    logits = np.asarray(_grouped_logits(q, k, scale), np.float64).reshape(1, hkv * g, T, T)
    mask = np.repeat(np.asarray(selected_mask(idx, T, 16, jnp.arange(T))), g, axis=1)
    want_lse = np.log2(np.where(mask, np.exp(logits), 0.0).sum(-1)) * (1.0 if impl == "gpu" else np.log(2.0))
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-5 * np.abs(want_lse).max())
    widx, wcnt = window_blocks(T, 20, 16)
    widx = np.pad(widx, ((0, 0), (0, 3 - widx.shape[1])), constant_values=-1)    # the selection's shapes: one compile
    widx = jnp.broadcast_to(jnp.asarray(widx), (1, hkv) + widx.shape)
    wcnt = jnp.broadcast_to(jnp.asarray(wcnt), (1, hkv, T))
    got, _ = nsa_select_block_outer(q, k, v, widx, wcnt, block_size=16, scale=scale, block_q=16, interpret=True,
                                    return_lse=True, window=20)
    want = np.asarray(masked_attention(q, k, v, window_mask(T, 20)[None, None], scale)[0])
    assert np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want) < 1e-5


def test_compressed_branch_kernel_matches_reference():
    """The compressed-branch kernel (output + selection importance, probabilities kept on chip) vs
    the jnp reference (`masked_attention` over `compressed_visible`, `block_importance`) and the
    importance against float64 numpy of the spec's formula: 75 tokens (odd), l=8, d=4, l'=16
    (overlap weights [1, 2, 2, 2, 1], as 32/16/64), GQA 3, tiles of 2 selection blocks (3 tiles:
    the carry of a tile's last key into the next tile's first block), query tiles of 16."""
    from models.nsa import block_importance, compressed_visible
    from pallas_kernels.gpu.nsa_compress import nsa_compressed
    cfg = NSAConfig(kernel_size=8, kernel_stride=4, block_size=16, top_n=2, init_blocks=1, local_blocks=1)
    T, hkv, g, d, scale = 75, 2, 3, 16, 0.3
    r = np.random.default_rng(7)
    nc = cfg.n_compressed(T)
    q = jnp.asarray(r.normal(size=(1, hkv * g, T, d)), jnp.float32)
    ck, cv = (jnp.asarray(r.normal(size=(1, hkv, nc, d)), jnp.float32) for _ in range(2))
    out, imp = nsa_compressed(q, ck, cv, kernel_size=8, kernel_stride=4, block_size=16, scale=scale, block_q=16,
                              blocks_per_tile=2, interpret=True)
    vis = compressed_visible(jnp.arange(T), nc, cfg)[None, None]
    want, p = masked_attention(q, ck, cv, vis, scale)
    assert float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want)) < 1e-5
    want_imp = np.asarray(block_importance(p, cfg.n_selection_blocks(T), cfg))
    # the spec's formula in float64: s_j = sum_o w_o P[j*4 - 1 + o], P summed over the group
    logits = np.einsum("hgtd,hsd->hgts", np.asarray(q, np.float64).reshape(hkv, g, T, d), np.asarray(ck[0], np.float64))
    logits = np.where(np.asarray(vis[0, 0]), logits * scale, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True, initial=-1e300))
    tot = e.sum(-1, keepdims=True)
    psum = np.divide(e, tot, out=np.zeros_like(e), where=tot > 0).sum(1)           # [hkv, T, nc]
    w = [1, 2, 2, 2, 1]
    f64 = np.zeros((hkv, T, 5))
    for j in range(5):
        for o in range(5):
            c = j * 4 - 1 + o
            if 0 <= c < nc:
                f64[:, :, j] += w[o] * psum[:, :, c]
    np.testing.assert_allclose(want_imp[0], f64, atol=1e-5 * f64.max())
    np.testing.assert_allclose(np.asarray(imp)[0], f64, atol=1e-5 * f64.max())
    with pytest.raises(ValueError, match="must not exceed block_size"):
        nsa_compressed(q, ck, cv, kernel_size=32, kernel_stride=4, block_size=16, interpret=True)
    with pytest.raises(ValueError, match="compressed keys"):
        nsa_compressed(q, ck[:, :, :5], cv[:, :, :5], kernel_size=8, kernel_stride=4, block_size=16, interpret=True)
