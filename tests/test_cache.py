"""KVCache pytree: append, gather, resize, reset and memory accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as kvcache


def _layer(cache, l):
    return jax.tree_util.tree_map(lambda x: x[l], cache)


def test_memory_bytes_equals_sum_of_array_bytes():
    c = kvcache.init_cache(3, 2, 4, 17, 8, jnp.bfloat16)
    held = sum(x.nbytes for x in (c.keys, c.values, c.positions, c.lengths))
    assert c.memory_bytes() == held
    # 3*2*4*17*8 * 2 bytes * (k+v) + positions int32 + lengths int32
    assert held == 3 * 2 * 4 * 17 * 8 * 2 * 2 + 3 * 2 * 4 * 17 * 4 + 3 * 2 * 4 * 4


def test_append_writes_each_head_at_its_own_offset():
    rng = np.random.default_rng(0)
    c = _layer(kvcache.init_cache(1, 2, 3, 10, 4), 0)
    c = kvcache.KVCache(c.keys, c.values, c.positions, jnp.asarray([[0, 2, 5], [1, 1, 1]], jnp.int32))
    k = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    v = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    pos = np.asarray([[7, 8, 9], [-1, 0, 1]], np.int32)
    out = kvcache.append(c, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos))
    lengths = np.asarray([[0, 2, 5], [1, 1, 1]])
    for b in range(2):
        for h in range(3):
            s = lengths[b, h]
            np.testing.assert_array_equal(np.asarray(out.keys[b, h, s:s + 3]), k[b, h])
            np.testing.assert_array_equal(np.asarray(out.values[b, h, s:s + 3]), v[b, h])
            np.testing.assert_array_equal(np.asarray(out.positions[b, h, s:s + 3]), pos[b])
            assert np.all(np.asarray(out.positions[b, h, :s]) == -1)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths + 3)


def test_gather_keeps_given_slots_per_head_and_really_shrinks():
    rng = np.random.default_rng(1)
    full = kvcache.init_cache(2, 1, 2, 12, 4)
    k = jnp.asarray(rng.normal(size=(2, 1, 2, 12, 4)), jnp.float32)
    full = kvcache.KVCache(k, k * 2, jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 1, 2, 12)),
                           jnp.full((2, 1, 2), 12, jnp.int32))
    idx = np.array([[[[0, 3, 7, 11], [1, 2, -1, -1]]], [[[5, 6, 8, 9], [0, 4, 10, -1]]]], np.int32)
    small = kvcache.gather(full, jnp.asarray(idx), capacity=6)
    assert small.capacity == 6
    # k, v float32 [2,1,2,6,4] + positions int32 [2,1,2,6] + lengths int32 [2,1,2]
    assert small.memory_bytes() == 2 * (2 * 2 * 6 * 4 * 4) + 2 * 2 * 6 * 4 + 2 * 2 * 4
    np.testing.assert_array_equal(np.asarray(small.lengths), [[[4, 2]], [[4, 3]]])
    for l in range(2):
        for h in range(2):
            kept = [i for i in idx[l, 0, h] if i >= 0]
            n = len(kept)
            np.testing.assert_array_equal(np.asarray(small.keys[l, 0, h, :n]), np.asarray(k[l, 0, h, kept]))
            np.testing.assert_array_equal(np.asarray(small.positions[l, 0, h, :n]), kept)
            assert np.all(np.asarray(small.positions[l, 0, h, n:]) == -1)
    with pytest.raises(ValueError, match="capacity"):
        kvcache.gather(full, jnp.asarray(idx), capacity=3)


def test_resize_and_reset():
    c = kvcache.init_cache(1, 1, 1, 4, 2)
    c = kvcache.KVCache(c.keys, c.values, c.positions.at[..., :2].set(jnp.asarray([0, 1])),
                        jnp.full((1, 1, 1), 2, jnp.int32))
    assert kvcache.resize(c, 9).capacity == 9
    assert kvcache.resize(c, 2).capacity == 2
    with pytest.raises(ValueError, match="holds 2 tokens"):
        kvcache.resize(c, 1)
    r = kvcache.reset(c)
    assert int(r.lengths.sum()) == 0 and bool(jnp.all(r.positions == -1))


def test_init_cache_rejects_bad_dimensions():
    with pytest.raises(ValueError, match="positive"):
        kvcache.init_cache(1, 1, 1, 0, 8)
