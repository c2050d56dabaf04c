"""Sparse-prefill block-mask builders (kvjax.sparse_prefill) vs float64 numpy loops of their specs,
the attention they drive vs a float64 masked softmax, the engine wiring, and errors.

The numpy references below are written from the method specs (shared/methods
quantization_and_sparse_attention.md §7, §9, DuoAttention) token by token, sharing nothing with
the jnp code: a query block's slots are the block_size slots from its first query (the kernel
masks the ones past the chunk), a block (i, j) is live when some query of block i may see a slot
of key block j (starts <= s <= q); both sides are compared on live blocks.
"""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from kvjax.cache import KVCache
from kvjax.observation import Observe
from kvjax.sparse_prefill import (FlexPrefill, MInference, StreamingPrefill, check_sparse_prefill,
                                  make_sparse_prefill)
from kvjax.sparse_prefill.attend import attend, block_mask


# ---------------------------------------------------------------------------------------------
# float64 numpy geometry and references

def np_geometry(t, s, bs, starts, lengths):
    """per (b, h): query slots, live block mask [nqb, nkb], first query slot of each block."""
    nqb, nkb = -(-t // bs), -(-s // bs)
    off = lengths - t
    live = np.zeros((nqb, nkb), bool)
    for i in range(t):
        q = off + i
        for sl in range(starts, q + 1):
            live[i // bs, sl // bs] = True
    firsts = [off + i * bs for i in range(nqb)]
    return live, firsts, nqb, nkb


def np_probs(q, k, qslots, starts, scale):
    """q [n, d], k [S, d] float64 -> softmax over starts <= s <= qslot [n, S]."""
    logits = q @ k.T * scale
    s = np.arange(k.shape[0])
    ok = (s[None] >= starts) & (s[None] <= np.asarray(qslots)[:, None])
    logits = np.where(ok, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def np_top(score, k):
    """indices of the k largest (ties: lower index first)."""
    return np.argsort(-score, kind="stable")[:k]


def np_cover(x, gamma):
    srt = np.sort(x)[::-1]
    cum = np.cumsum(srt)
    return int(np.sum(cum < gamma * cum[-1])) + 1


def np_minference_head(q, k, qslots, starts, t, bs, nqb, nkb, firsts, live, vertical, slash, last_q, scale,
                       columns=False):
    """The head's block mask [nqb, nkb] (vertical keys as whole blocks); columns=True: (the slash
    blocks alone, the vertical key slots) -- the column form."""
    n = min(last_q, t)
    p = np_probs(q[t - n:], k, qslots[t - n:], starts, scale)
    s = k.shape[0]
    vert = p.sum(0)
    vert[starts:starts + 30] = np.inf
    sl = np.zeros(s)
    for r in range(n):
        for slot in range(s):
            o = qslots[t - n + r] - slot
            if o >= 0:
                sl[o] += p[r, slot]
    sl[:100] = np.inf
    cols = np_top(vert, min(t, max(vertical, 30)))
    offs = np_top(sl, min(t, max(slash, 50)))
    m = np.zeros((nqb, nkb), bool)
    for i in range(nqb):
        for c in cols:
            m[i, c // bs] = not columns
        for qs in range(firsts[i], firsts[i] + bs):
            for o in offs:
                if 0 <= qs - o < nkb * bs:
                    m[i, (qs - o) // bs] = True
    if columns:
        return m & live, set(int(c) for c in cols)
    return m & live


def np_sink_local(t, bs, nqb, nkb, firsts, live, starts, sink, local):
    m = np.zeros((nqb, nkb), bool)
    for i in range(nqb):
        for qs in range(firsts[i], firsts[i] + bs):
            for slot in range(nkb * bs):
                if starts <= slot < starts + sink or qs - local < slot <= qs:
                    m[i, slot // bs] = True
    return m & live


def np_js(p, q):
    m = 0.5 * (p + q)
    kl = lambda a: sum(a[i] * np.log(a[i] / m[i]) for i in range(len(a)) if a[i] > 0)
    return np.sqrt(max(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def np_flexprefill_head(q, k, qslots, starts, length, t, bs, nqb, nkb, firsts, live, fp, scale):
    """FlexPrefill get_active_blocks for one query head (spec §7), float64."""
    if length - starts <= max(2 * bs, fp.min_budget):
        return live.copy()
    s = k.shape[0]
    n = min(bs, t)
    p = np_probs(q[t - n:], k, qslots[t - n:], starts, scale)
    vert = p.mean(0)
    sl = np.zeros(s)
    for r in range(n):
        for slot in range(s):
            if qslots[t - n + r] - slot >= 0:
                sl[qslots[t - n + r] - slot] += p[r, slot] / n
    lo = fp.min_budget // bs
    hi = nkb if fp.max_budget is None else fp.max_budget // bs
    nv = int(np.clip(np_cover(vert, fp.gamma) // 128 + 1, lo, hi))
    ns = int(np.clip(np_cover(sl, fp.gamma) // 128 + 1, lo, hi))
    vblk = np.array([vert[j * bs:(j + 1) * bs].sum() for j in range(nkb)])
    sblk = np.array([sl[j * bs:(j + 1) * bs].sum() for j in range(nkb)])
    kp = np.zeros((nkb, k.shape[1]))
    for j in range(nkb):
        rows = [slot for slot in range(j * bs, min((j + 1) * bs, s)) if starts <= slot < length]
        if rows:
            kp[j] = k[rows].mean(0)
    qhat = (q[t - n:] * scale).mean(0)
    last = qslots[-1]
    seen = np.array([j * bs <= last and (j + 1) * bs - 1 >= starts for j in range(nkb)])
    z = np.where(seen, kp @ qhat, -np.inf)
    avg = np.exp(z - z.max())
    avg /= avg.sum()
    query_aware = np_js(avg, vblk) < fp.tau
    if query_aware:
        nv = ns = lo
    vblk[starts // bs] = np.inf
    sblk[0] = np.inf
    cols, diags = set(np_top(vblk, nv)), set(np_top(sblk, ns)) | {-1}
    m = np.zeros((nqb, nkb), bool)
    for i in range(nqb):
        qa = firsts[i] // bs
        for j in range(nkb):
            m[i, j] = j in cols or (qa - j) in diags
    if query_aware:
        qp = np.stack([q[i * bs:min((i + 1) * bs, t)].mean(0) for i in range(nqb)])
        att = np.where(live, qp @ kp.T * scale, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = np.where(live, att / att.sum(-1, keepdims=True), 0.0)
        flat = att.reshape(-1)
        order = np.argsort(-flat, kind="stable")
        keep = np.cumsum(flat[order]) <= fp.gamma * nqb
        extra = np.zeros(flat.shape, bool)
        extra[order[keep]] = True
        m |= extra.reshape(nqb, nkb)
    return m & live


def np_method_mask(method, q, k, starts, lengths, layer=0):
    """[b, hkv, nqb, nkb] union over each kv head's query heads of the per-head numpy masks."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, bs, scale = hq // hkv, method.block_size, d ** -0.5
    out = None
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            st, ln = int(starts[bi, kh]), int(lengths[bi, kh])
            live, firsts, nqb, nkb = np_geometry(t, s, bs, st, ln)
            qslots = [ln - t + i for i in range(t)]
            if out is None:
                out = np.zeros((b, hkv, nqb, nkb), bool)
            if isinstance(method, FlexPrefill):
                m = np_flexprefill_head(q[bi, h], k[bi, kh], qslots, st, ln, t, bs, nqb, nkb, firsts, live, method,
                                        scale)
            elif isinstance(method, MInference) and method.kind == "vertical_and_slash":
                m = np_minference_head(q[bi, h], k[bi, kh], qslots, st, t, bs, nqb, nkb, firsts, live,
                                       method.vertical, method.slash, method.last_q, scale)
            elif isinstance(method, MInference):
                m = np_sink_local(t, bs, nqb, nkb, firsts, live, st, method.vertical, method.slash)
            else:
                m = np_sink_local(t, bs, nqb, nkb, firsts, live, st, method.sink, method.local)
                if method.pattern is not None and method.pattern[layer][kh]:
                    m = live.copy()
            out[bi, kh] |= m
    return out


# ---------------------------------------------------------------------------------------------
# inputs: keys with a few "sink"/"vertical" columns so the methods have structure to find

def _inputs(seed, b, hq, hkv, t, s, d, starts, lengths):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, hq, t, d), jnp.float32)
    k = jax.random.normal(kk, (b, hkv, s, d), jnp.float32)
    heavy = jnp.zeros((s,)).at[jnp.array([1, 7, s // 3])].set(1.0)
    k = k + 2.0 * heavy[None, None, :, None] * jnp.mean(q, axis=(1, 2))[:, None, None, :]
    v = jax.random.normal(kv, (b, hkv, s, d), jnp.float32)
    return q, k, v, jnp.asarray(starts, jnp.int32), jnp.asarray(lengths, jnp.int32)


# odd sizes: chunk not a multiple of the block, offsets lengths - T not aligned, left padding (starts > 0)
SMALL = dict(b=2, hq=6, hkv=2, t=37, s=83, d=16, starts=[[0, 0], [5, 5]], lengths=[[75, 75], [66, 66]])
MID = dict(b=2, hq=6, hkv=2, t=70, s=300, d=16, starts=[[0, 0], [9, 9]], lengths=[[290, 290], [251, 251]])
BIG = dict(b=1, hq=3, hkv=1, t=64, s=420, d=16, starts=[[2]], lengths=[[410]])

CASES = [
    (MInference(vertical=6, slash=9, last_q=8, block_size=16), MID, 0),
    (MInference(kind="a_shape", vertical=5, slash=20, block_size=16), SMALL, 2),
    (StreamingPrefill(sink=3, local=30, block_size=16, pattern=((1, 0),)), SMALL, 4),   # kv head 0 retrieval
    (FlexPrefill(gamma=0.9, tau=0.1, min_budget=16, block_size=16), SMALL, 5),
    (FlexPrefill(gamma=0.7, tau=0.082, min_budget=32, block_size=16), BIG, 7),  # head 0 vertical-slash, 1-2 query-aware
    (FlexPrefill(gamma=0.9, tau=0.0, min_budget=16, block_size=16), BIG, 9),     # every head vertical-slash
    (FlexPrefill(gamma=0.9, min_budget=512, block_size=16), BIG, 8),              # context <= min_budget: dense
]


@functools.partial(jax.jit, static_argnums=0)
def _block_mask(method, q, k, starts, lengths):
    """(mask, live blocks), compiled once (eager op-by-op dispatch is slow on the shared CPU)."""
    mask, geo = block_mask(method, q, k, starts, lengths, 0, q.shape[-1] ** -0.5)
    return mask, geo.live_blocks()


@pytest.mark.parametrize("method,shape,seed", CASES, ids=[f"{type(m).__name__}-{i}" for i, (m, _, _) in
                                                         enumerate(CASES)])
def test_block_mask_matches_float64_spec(method, shape, seed):
    q, k, _, starts, lengths = _inputs(seed, **shape)
    mask, live = _block_mask(method, q, k, starts, lengths)
    ref = np_method_mask(method, q, k, np.asarray(starts), np.asarray(lengths))
    live = np.asarray(live)
    assert np.array_equal(np.asarray(mask), ref), (np.argwhere(np.asarray(mask) != ref), ref.mean())
    assert 0 < ref.sum() <= live.sum()
    if isinstance(method, FlexPrefill) and method.min_budget == 512:
        assert ref.sum() == live.sum()                                          # dense fallback
    elif not (isinstance(method, StreamingPrefill) and method.pattern):
        assert ref.sum() < live.sum()                                           # really sparse


def test_flexprefill_case_7_has_both_patterns():
    """Case 7's tau splits the heads: sqrt-JS of head 0 above it (vertical-slash), heads 1-2 below
    (query-aware), by the float64 spec formula; js_distance agrees with it."""
    from kvjax.sparse_prefill.flexprefill import js_distance
    q, k, _, _, _ = _inputs(7, **BIG)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n = bs = 16
    js = []
    for h in range(BIG["hq"]):
        p = np_probs(qn[0, h, -n:], kn[0, 0], np.arange(410 - n, 410), 2, 0.25)
        vblk = np.array([p.mean(0)[j * bs:(j + 1) * bs].sum() for j in range(27)])
        kp = np.stack([kn[0, 0, max(j * bs, 2):min((j + 1) * bs, 410)].mean(0) if j * bs < 410 else np.zeros(16)
                       for j in range(27)])
        z = np.where(np.arange(27) * bs <= 409, kp @ (qn[0, h, -n:] * 0.25).mean(0), -np.inf)
        avg = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        js.append(np_js(avg, vblk))
        assert abs(float(js_distance(jnp.asarray(avg, jnp.float32), jnp.asarray(vblk, jnp.float32))) - js[-1]) < 1e-4
    assert js[0] > 0.084 and max(js[1:]) < 0.080, js


def np_attention(q, k, v, starts, lengths, mask, bs, columns=None):
    """float64 attention of each query over the causal live slots of its listed blocks, plus the
    slots in columns[b][kv_head] (a set) when given."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros(q.shape)
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            for i in range(t):
                qs = int(lengths[bi, kh]) - t + i
                ok = [s for s in range(int(starts[bi, kh]), qs + 1)
                      if mask[bi, kh, i // bs, s // bs] or (columns is not None and s in columns[bi][kh])]
                if not ok:
                    continue
                z = k[bi, kh, ok] @ q[bi, h, i] * d ** -0.5
                w = np.exp(z - z.max())
                out[bi, h, i] = (w / w.sum()) @ v[bi, kh, ok]
    return out


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_attend_matches_masked_float64_attention(backend):
    method = FlexPrefill(gamma=0.9, min_budget=16, block_size=16)
    shape = SMALL
    q, k, v, starts, lengths = _inputs(11, **shape)
    s = shape["s"]
    slot = jnp.arange(s)
    pos = jnp.where((slot >= starts[..., None]) & (slot < lengths[..., None]), slot, -1)
    cache = KVCache(keys=k, values=v, positions=pos.astype(jnp.int32), lengths=lengths)
    qpos = (lengths[:, 0:1] - shape["t"] + jnp.arange(shape["t"])).astype(jnp.int32)
    run = jax.jit(lambda q, cache, qpos: attend(method, q, cache, qpos, backend=backend, observe=Observe(window=4)))
    out, obs = run(q, cache, qpos)
    ref_mask = np_method_mask(method, q, k, np.asarray(starts), np.asarray(lengths))
    ref = np_attention(q, k, v, np.asarray(starts), np.asarray(lengths), ref_mask, 16)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 2e-5, err
    dens = np.asarray(obs["prefill_density"])
    live = np.asarray(_block_mask(method, q, k, starts, lengths)[1])
    np.testing.assert_array_equal(dens[..., 0], ref_mask.sum((-1, -2)))
    np.testing.assert_array_equal(dens[..., 1], live.sum((-1, -2)))
    assert obs["window_probs"].shape == (2, 6, 4, s)


def test_minference_column_form_matches_float64_attention():
    """MInference's verticals as gathered single columns (the default, as the official kernel):
    each query attends the slash blocks plus exactly the vertical key slots before it, not their
    whole blocks -- float64 spec loop vs the GPU kernel in interpret mode; the density counts the
    unlisted columns as 1/block_size of a block and stays below the block form's."""
    shape = MID
    method = MInference(vertical=6, slash=9, last_q=8, block_size=16)
    q, k, v, starts, lengths = _inputs(13, **shape)
    s, t, bs = shape["s"], shape["t"], 16
    slot = jnp.arange(s)
    pos = jnp.where((slot >= starts[..., None]) & (slot < lengths[..., None]), slot, -1)
    cache = KVCache(keys=k, values=v, positions=pos.astype(jnp.int32), lengths=lengths)
    qpos = (lengths[:, 0:1] - t + jnp.arange(t)).astype(jnp.int32)
    run = jax.jit(lambda q, cache, qpos: attend(method, q, cache, qpos, backend="interpret"))
    out, obs = run(q, cache, qpos)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    ref_mask = np.zeros((b, hkv) + np_geometry(t, s, bs, 0, s)[0].shape, bool)
    cols = [[set() for _ in range(hkv)] for _ in range(b)]
    for bi in range(b):
        for h in range(hq):
            st, ln = int(starts[bi, h // g]), int(lengths[bi, h // g])
            live, firsts, nqb, nkb = np_geometry(t, s, bs, st, ln)
            m, c = np_minference_head(qn[bi, h], kn[bi, h // g], [ln - t + i for i in range(t)], st, t, bs, nqb, nkb,
                                      firsts, live, 6, 9, 8, d ** -0.5, columns=True)
            ref_mask[bi, h // g] |= m
            cols[bi][h // g] |= {x for x in c if st <= x < ln}
    ref = np_attention(q, k, v, np.asarray(starts), np.asarray(lengths), ref_mask, bs, columns=cols)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 2e-5, err
    blocks_form = np_attention(q, k, v, np.asarray(starts), np.asarray(lengths),
                               np_method_mask(method, q, k, np.asarray(starts), np.asarray(lengths)), bs)
    assert np.linalg.norm(blocks_form - ref) / np.linalg.norm(ref) > 1e-3        # the two forms differ
    dens = np.asarray(obs["prefill_density"])
    full_blocks = np_method_mask(method, q, k, np.asarray(starts), np.asarray(lengths)).sum((-1, -2))
    assert np.all(dens[..., 0] >= ref_mask.sum((-1, -2))) and np.all(dens[..., 0] < full_blocks)


# ---------------------------------------------------------------------------------------------
# engine

from models.config import ModelConfig  # noqa: E402
from models.llama import init_params  # noqa: E402

CFG = ModelConfig(name="tiny", vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16,
                  ffn_dim=64, rope_theta=10000.0)
PROMPTS = [list(np.random.RandomState(0).randint(0, 97, 150)), list(np.random.RandomState(1).randint(0, 97, 77))]


@pytest.fixture(scope="module")
def tiny():
    from kvjax.generate import generate
    params = init_params(CFG, jax.random.PRNGKey(0), scale=0.25)
    return params, generate


def test_generate_full_coverage_equals_dense(tiny):
    """A method listing every causal block (local window longer than the prompt) reproduces the dense
    prefill in the generate loop: same tokens, chunked (64), left-padded rows (the interpreted GPU
    kernel is checked against float64 in test_attend_matches_masked_float64_attention)."""
    params, generate = tiny
    dense = generate(params, CFG, PROMPTS, 5, chunk_size=64)
    res = generate(params, CFG, PROMPTS, 5, chunk_size=64,
                   prefill_attention="block_sparse:streaming:block_size=16,local=4096")
    assert res.tokens == dense.tokens
    assert "StreamingPrefill" in res.stats["prefill_attention"]


def test_forward_sparse_prefill_density(tiny):
    """A sparse method changes the prefill (logits differ from dense) and reports its density per
    layer and kv head: sink block + the 2 local blocks of each query block (listed / live)."""
    from kvjax.generate import forward_jit, init_engine_cache
    params, _ = tiny
    toks = jnp.asarray([PROMPTS[0][:128]], jnp.int32)
    pos = jnp.arange(128, dtype=jnp.int32)[None]
    sp = make_sparse_prefill("block_sparse:streaming:block_size=16,sink=4,local=16")
    ld, _, _ = forward_jit(params, toks, pos, init_engine_cache(CFG, 1, 128, jnp.float32), CFG)
    ls, _, outs = forward_jit(params, toks, pos, init_engine_cache(CFG, 1, 128, jnp.float32), CFG,
                              prefill_attention=sp)
    assert float(jnp.max(jnp.abs(ld - ls))) > 1e-3
    dens = np.asarray(outs["prefill_density"])                                  # [L, B, Hkv, 2]
    # 8 query blocks: block 0 -> {0}, block 1 -> {0, 1}, blocks i >= 2 -> {0, i-1, i}: 1 + 2 + 6*3 = 21 of 36
    np.testing.assert_array_equal(dens, np.broadcast_to([21.0, 36.0], (2, 1, 2, 2)))


def test_errors(tiny):
    params, generate = tiny
    for spec, msg in [("block_sparse:nope", "unknown sparse-prefill method"), ("block_sparse:", "expected"),
                      ("flexprefill:gamma", "not key=value"), ("flexprefill:bogus=1", "bogus"),
                      ("flexprefill:gamma=1.5", "gamma"), ("minference:kind=diagonal", "unknown MInference pattern"),
                      ("streaming:local=0", "local >= 1")]:
        with pytest.raises(ValueError, match=msg):
            make_sparse_prefill(spec)
    with pytest.raises(ValueError, match="power of two"):
        check_sparse_prefill(FlexPrefill(block_size=48), CFG)
    with pytest.raises(ValueError, match="pattern must be"):
        check_sparse_prefill(StreamingPrefill(pattern=((1, 0, 1),)), CFG)
    with pytest.raises(ValueError, match="dense cache"):
        from kvjax.quant import make_cache_init
        generate(params, CFG, PROMPTS, 2, prefill_attention="block_sparse:flexprefill",
                 cache_init=make_cache_init("kivi4"))
    with pytest.raises(ValueError, match="unknown sparse-prefill method"):
        generate(params, CFG, PROMPTS, 2, prefill_attention="block_sparse:quest")
    q, k, v, starts, lengths = _inputs(0, **SMALL)
    with pytest.raises(TypeError, match="dense KVCache"):
        attend(FlexPrefill(block_size=16), q, object(), jnp.zeros((2, 37), jnp.int32))
    cache = KVCache(keys=k, values=v, positions=jnp.zeros(k.shape[:3], jnp.int32), lengths=lengths)
    with pytest.raises(ValueError, match="column sums"):
        attend(FlexPrefill(block_size=16), q, cache, jnp.zeros((2, 37), jnp.int32), observe=Observe(column_sums=True))


def test_cli_flag():
    from kvjax.cli import build_parser, sparse_prefill_from_args
    p = build_parser()
    args = p.parse_args(["generate", "--prompt", "hi", "--prefill-attention", "block_sparse:flexprefill:gamma=0.95"])
    assert sparse_prefill_from_args(args) == FlexPrefill(gamma=0.95)
    assert sparse_prefill_from_args(p.parse_args(["generate", "--prompt", "hi"])) is None
