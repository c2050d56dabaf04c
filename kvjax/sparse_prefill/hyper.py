"""HyperAttention (Han et al., ICLR 2024, arXiv 2310.05869; insuhan/hyper-attn
`models/attention/hyper_attn.py`, `angular_lsh.py`) as a block selection for the block-sparse
kernel. Defaults from the official code: lsh_num_projs 7, block_size (sorted block) 256 tokens,
sample_size 256, min_seq_len 4096.

Official algorithm (causal): a sequence of at most min_seq_len keys is attended exactly; a longer
one is split in halves: the two causal halves recursively, and the off-diagonal rectangle
(second-half queries x first-half keys) without mask -- exactly if it has fewer than min_seq_len
query rows, else by (1) sortLSH: angular LSH with r random hyperplanes, bucket = the reflected
Gray code of the sign bits (`perm[bin]`, adjacent buckets differ in one bit), queries and keys
sorted by bucket, exact attention on the block diagonal of the sorted order (256 keys a block),
and (2) sample_size key columns drawn uniformly (with replacement) for the rest.

Block form here (the kernel computes exact attention over listed `block_size` = 64 blocks, so
the selection is made per block, with these deviations):
* The recursion runs on whole key blocks of the live range [starts // bs, ceil(lengths / bs))
  (split at ceil(n / 2) blocks; a half of n blocks is dense when n * bs <= min_seq_len, a
  rectangle when its rows * bs < min_seq_len). A context of at most min_seq_len live tokens is
  dense (the official exact path). A chunk's query block covers one or two grid rows (unaligned
  offset); it gets the union of their selections.
* sortLSH on block means: each key block is hashed by the mean of its live keys, each query block
  by the mean of its queries (per query head; the hyperplanes are shared by all heads of a layer,
  as the official `AngularLSH(dim=(1, 1, d))`). Inside a rectangle the key blocks are sorted by
  (bucket, index) and cut into groups of G = lsh_block // block_size; a query block is paired
  with the group holding its bucket's insertion point among the sorted keys (the official code
  pairs by the query's rank among all queries: a chunked prefill does not hold the earlier
  chunks' queries; for matching distributions the two agree).
* Sampling: sample_size // block_size key blocks drawn uniformly with replacement in every
  rectangle (draws u in [0, 1) per (batch, query head), shared by the rectangles: block
  c0 + floor(u * n_cols)). They are attended exactly with the rest: the official n / m
  re-weighting of sampled columns has no place in an exact block-sparse softmax.
* Sink: the key blocks holding the first `sink` live tokens are listed for every query block
  (default 64 = one block; sink=0 is the official selection). The official code has no sink; the
  attention sink (Xiao et al. 2023, StreamingLLM) takes a large share of most heads' mass, and
  sortLSH pairs it only with the queries of its bucket, so a rectangle without it shifts those
  rows' softmax. SmolLM2-135M, 2K context, min_seq_len 512 (docs/sparse_prefill_quality.json):
  KL of the first next-token distribution 0.43 nats without the sink, 0.0027 with it, at density
  0.869 -> 0.874. The dense fallback is unchanged.
GQA: the query heads' masks are unioned per kv head (the kernel shares one list).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.sparse_prefill.base import Geometry, pool_keys, pool_queries, repeat_heads, sink_local


@dataclasses.dataclass(frozen=True)
class HyperAttention:
    lsh_num_projs: int = 7
    lsh_block: int = 256           # tokens per block of the sorted order
    sample_size: int = 256         # sampled key tokens per rectangle (-> sample_size // block_size blocks)
    min_seq_len: int = 4096
    block_size: int = 64
    seed: int = 0
    sink: int = 64                 # first live tokens listed for every query block (0: official, no sink)

    def __post_init__(self):
        if not 1 <= self.lsh_num_projs <= 16:
            raise ValueError(f"HyperAttention lsh_num_projs must be in [1, 16], got {self.lsh_num_projs}")
        if self.lsh_block < self.block_size or self.sample_size < 0 or self.min_seq_len < 0 or self.sink < 0:
            raise ValueError(f"HyperAttention needs lsh_block >= block_size, sample_size >= 0, min_seq_len >= 0, "
                             f"sink >= 0, got lsh_block={self.lsh_block} block_size={self.block_size} "
                             f"sample_size={self.sample_size} min_seq_len={self.min_seq_len} sink={self.sink}")

    @classmethod
    def from_args(cls, **kw) -> "HyperAttention":
        return cls(**{k: int(v) for k, v in kw.items()})

    @property
    def n_samples(self) -> int:
        return self.sample_size // self.block_size

    def draws(self, layer, head_dim: int, batch: int, q_heads: int) -> tuple[jax.Array, jax.Array]:
        """(hyperplanes [head_dim, lsh_num_projs] float32, sample draws [batch, q_heads, n_samples]
        in [0, 1)) of `layer` (traced index allowed)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), layer)
        kp, ku = jax.random.split(key)
        planes = jax.random.normal(kp, (head_dim, self.lsh_num_projs), jnp.float32)
        return planes, jax.random.uniform(ku, (batch, q_heads, self.n_samples), jnp.float32)

    def select(self, q: jax.Array, keys: jax.Array, geo: Geometry, layer, scale: float) -> jax.Array:
        """[b, hq, nqb, nkb] bool block mask per query head."""
        b, hq, t, d = q.shape
        g = hq // keys.shape[1]
        bs, nkb = geo.block_size, geo.nkb
        planes, draws = self.draws(layer, d, b, hq)
        h_k = repeat_heads(lsh_bucket(pool_keys(keys, geo), planes), g)             # [b, hq, nkb]
        h_q = lsh_bucket(pool_queries(q, bs), planes)                                # [b, hq, nqb]
        nbk = 2 ** self.lsh_num_projs
        onehot = h_k[..., None] == jnp.arange(nbk)                                   # [b, hq, nkb, nbk]
        below = jnp.cumsum(onehot, axis=2) - onehot                                  # # j' < j per bucket
        cnt = jnp.concatenate([below, below[:, :, -1:] + onehot[:, :, -1:]], axis=2)  # [b, hq, nkb+1, nbk]
        less = jnp.cumsum(cnt, axis=-1) - cnt                                        # # j' < c with bucket < h
        at = lambda tab, c, h: jnp.take_along_axis(tab.reshape(b, hq, -1), (c * nbk + h).reshape(b, hq, -1),
                                                   axis=-1).reshape(c.shape)
        i = jnp.arange(geo.nqb, dtype=jnp.int32)
        first = geo.offset[..., None] + i * bs
        last = geo.offset[..., None] + jnp.minimum((i + 1) * bs, t) - 1
        j = jnp.broadcast_to(jnp.arange(nkb, dtype=jnp.int32), (b, hq, geo.nqb, nkb))
        hj = jnp.broadcast_to(h_k[:, :, None, :], j.shape)
        hqb = jnp.broadcast_to(h_q[..., None], j.shape)
        g_sz = self.lsh_block // bs
        mask = jnp.zeros(j.shape, bool)
        for row in (first // bs, last // bs):                                        # grid rows of a query block
            state, c0, c1 = self._regions(repeat_heads(row, g)[..., None], j, repeat_heads(geo.starts, g),
                                          repeat_heads(geo.lengths, g), geo)
            nc = jnp.maximum(c1 - c0, 1)
            rank = at(less, c1, hj) - at(less, c0, hj) + at(cnt, j, hj) - at(cnt, c0, hj)
            ins = at(less, c1, hqb) - at(less, c0, hqb)
            group = jnp.minimum(ins // g_sz, (nc - 1) // g_sz)
            lsh = rank // g_sz == group
            picks = c0[..., None] + jnp.floor(draws[:, :, None, None, :] * nc[..., None]).astype(jnp.int32)
            sampled = (picks == j[..., None]).any(-1)
            mask = mask | (state == DENSE) | ((state == HYPER) & (lsh | sampled))
        dense = repeat_heads(geo.lengths - geo.starts, g) <= self.min_seq_len
        sink = repeat_heads(sink_local(geo, self.sink, 0), g)
        return mask | sink | dense[..., None, None]

    def _regions(self, a, j, starts, lengths, geo: Geometry):
        """The causal recursion on key blocks: a [b, h, nqb, 1] grid row, j [b, h, nqb, nkb] ->
        (state int32: DENSE / HYPER / NONE, rectangle columns [c0, c1) of HYPER pairs)."""
        bs = geo.block_size
        lo = jnp.broadcast_to((starts // bs)[..., None, None], j.shape)
        hi = jnp.broadcast_to((-(-lengths // bs))[..., None, None], j.shape)
        ok = (j <= a) & (j >= lo) & (a < hi)
        state = jnp.where(ok, PENDING, NONE)
        c0 = c1 = jnp.zeros_like(j)
        for _ in range(max(1, math.ceil(math.log2(max(geo.nkb, 2)))) + 2):
            n = hi - lo
            pend = state == PENDING
            small = pend & (n * bs <= self.min_seq_len)
            mid = lo + (n + 1) // 2
            rect = pend & ~small & (a >= mid) & (j < mid)
            rect_dense = (hi - mid) * bs < self.min_seq_len
            state = jnp.where(small | (rect & rect_dense), DENSE, jnp.where(rect, HYPER, state))
            c0 = jnp.where(rect, lo, c0)
            c1 = jnp.where(rect, mid, c1)
            go = pend & ~small & ~rect
            lo, hi = jnp.where(go & (j >= mid), mid, lo), jnp.where(go & (a < mid), mid, hi)
        return state, c0, c1


NONE, DENSE, HYPER, PENDING = 0, 1, 2, 3


def gray_order(n_bits: int) -> np.ndarray:
    """The official bucket table `perm` for n_bits: the reflected sequence built by
    perm(1) = [0, 1], perm(n) = perm(n-1) ++ reversed(perm(n-1)) + 2^(n-1)."""
    perm = np.array([0, 1])
    for k in range(1, n_bits):
        perm = np.concatenate([perm, perm[::-1] + 2 ** k])
    return perm


def lsh_bucket(x: jax.Array, planes: jax.Array) -> jax.Array:
    """Angular LSH bucket of every vector: x [..., d], planes [d, r] -> [...] int32 =
    perm[sum_k (x . planes[:, k] > 0) 2^k]."""
    bits = (jnp.einsum("...d,dr->...r", x.astype(jnp.float32), planes) > 0).astype(jnp.int32)
    bins = jnp.sum(bits * (2 ** jnp.arange(planes.shape[1], dtype=jnp.int32)), axis=-1)
    return jnp.asarray(gray_order(planes.shape[1]), jnp.int32)[bins]
