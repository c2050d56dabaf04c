"""Fused KIVI 2/4-bit decode kernel (interpret mode) vs float64 numpy attention over the
dequantised cache built from the layout contract (kvjax/quant/LAYOUT.md)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_numpy_reference import attention, make_kivi
from pallas_kernels import reference
from pallas_kernels.gpu.kivi_decode import _asm_source, unpack_fields
from pallas_kernels.gpu.kivi_decode import kivi_decode as gpu_kivi

ORDER = ["k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_resid", "v_resid",
         "k_len", "v_len", "lengths"]


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("bits,v_bits,g,d,gps,splits,variant", [
    (2, 2, 4, 64, 4, 1, "stacked_asm"),  # interpret: the "stacked_mask" bit ops, fields 0..3
    (4, 4, 3, 64, None, 1, "stacked"), (2, 2, 4, 64, 8, 2, "stacked"),
    (4, 4, 3, 64, 1, 1, "dequant"), (2, 2, 4, 64, 2, 2, "dequant"),
    (4, 2, 8, 64, None, 3, "dequant"), (2, 4, 1, 64, 4, None, "dequant")])
def test_kivi_kernel_matches_numpy(bits, v_bits, g, d, gps, splits, variant):
    rng = np.random.default_rng(bits * 10 + g)
    b, hkv, group, r, capq = 2, 2, 16, 32, 64
    # empty head, 1 token (all fp), odd length with quantised K+V and both fp segments, full
    lengths = np.array([[0, 1], [53, capq + r - 3]])
    arr, kt, vt = make_kivi(rng, b, hkv, d, bits, group, r, capq, lengths, v_bits=v_bits)
    starts = np.array([[0, 0], [5, 0]], np.int32)  # left padding on one head
    q = jnp.asarray(rng.standard_normal((b, hkv * g, d)), jnp.bfloat16)
    args = [q] + [jnp.asarray(arr[n]) for n in ORDER]
    args[7] = args[7].astype(jnp.bfloat16)
    args[8] = args[8].astype(jnp.bfloat16)
    # the residual arrays were rounded to bf16 above: rebuild the fp part of the oracle from them
    kr, vr = _f64(args[7]), _f64(args[8])
    for i in range(b):
        for h in range(hkv):
            n, kl, vl = lengths[i, h], arr["k_len"][i, h], arr["v_len"][i, h]
            kt[i, h, kl:n] = kr[i, h, :n - kl]
            vt[i, h, vl:n] = vr[i, h, :n - vl]
    t = np.arange(kt.shape[2])[None]
    want = np.stack([attention(_f64(q)[i], kt[i], vt[i],
                               (t < lengths[i][:, None]) & (t >= starts[i][:, None]), d ** -0.5)
                     for i in range(b)])
    got = _f64(gpu_kivi(*args, jnp.asarray(starts), bits=bits, v_bits=v_bits, group_size=group,
                        num_splits=splits,
                        tile_groups=gps, variant=variant, interpret=True))
    assert np.isfinite(got).all() and np.all(got[0, :g] == 0)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    ref = _f64(reference.kivi_decode(*args, jnp.asarray(starts), bits=bits, v_bits=v_bits,
                                     group_size=group))
    # the dispatcher (CPU -> reference; interpret -> GPU kernel) computes the same
    import pallas_kernels
    via = _f64(pallas_kernels.kivi_decode(*args, jnp.asarray(starts), bits=bits, v_bits=v_bits,
                                          group_size=group))
    np.testing.assert_allclose(via, ref, atol=1e-6)
    np.testing.assert_allclose(ref, want, atol=2e-2, rtol=2e-2)


def test_kivi_errors():
    rng = np.random.default_rng(0)
    arr, _, _ = make_kivi(rng, 1, 1, 32, 2, 16, 32, 64, np.array([[40]]))
    q = jnp.zeros((1, 2, 32), jnp.bfloat16)
    args = [q] + [jnp.asarray(arr[n]) for n in ORDER]
    with pytest.raises(ValueError, match="bits"):
        gpu_kivi(*args, bits=3, group_size=16, interpret=True)
    with pytest.raises(ValueError, match="group_size"):
        gpu_kivi(*args, bits=2, group_size=24, interpret=True)
    with pytest.raises(ValueError, match="codes"):
        gpu_kivi(*args, bits=4, group_size=16, interpret=True)
    with pytest.raises(ValueError, match="variant"):
        gpu_kivi(*args, bits=2, group_size=16, variant="fused", interpret=True)
    arr, _, _ = make_kivi(rng, 1, 1, 64, 2, 16, 32, 64, np.array([[40]]))
    args = [q[..., :1].repeat(64, axis=-1)] + [jnp.asarray(arr[n]) for n in ORDER]
    with pytest.raises(ValueError, match="tile_groups"):
        gpu_kivi(*args, bits=2, group_size=16, tile_groups=3, interpret=True)


def _run_ptx(src: str, word: int, src_reg: str) -> list[int]:
    """Execute the prmt.b32 / and.b32 lines of `src` (PTX ISA semantics, written from the ISA
    manual) on the 32-bit input register src_reg = word; returns the output registers $0, $1, ... in order."""
    regs = {}
    n_out = 0
    for line in src.replace("{", "").replace("}", "").split("\n"):
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        ops = [x.strip() for x in rest.split(",")]
        val = lambda x: int(x, 16) if x.startswith("0x") else (word if x == src_reg else regs[x])
        if op == "prmt.b32":  # d.byte[i] = byte selector[i] of the 8-byte {b, a}
            a, b, c = val(ops[1]), val(ops[2]), val(ops[3])
            pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
            regs[ops[0]] = sum(pool[(c >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op == "and.b32":
            regs[ops[0]] = val(ops[1]) & val(ops[2])
        else:
            raise AssertionError(f"unexpected instruction {op}")
        if ops[0].startswith("$"):
            n_out = max(n_out, int(ops[0][1:]) + 1)
    return [regs[f"${i}"] for i in range(n_out)]


@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_fields_exact_and_asm_equivalent(bits):
    """Every byte value: the shift-free unpack gives 1024 + code * 2**(f*bits) in fp16 (code from
    numpy shifts), and the inline PTX (interpreted from its text) gives the same fp16 bits for
    4 bytes per register (Triton's pack=4 register layout: byte k = element k, low half first)."""
    codes = np.arange(256, dtype=np.uint8)
    fields = [np.asarray(x) for x in unpack_fields(jnp.asarray(codes), bits, "mask")]
    shifted = [np.asarray(x, np.float64) for x in unpack_fields(jnp.asarray(codes), bits, "shift")]
    for f, x in enumerate(fields):
        code = (codes.astype(np.int64) >> (f * bits)) & ((1 << bits) - 1)
        np.testing.assert_array_equal(x.astype(np.float64), 1024 + code * 2.0 ** (f * bits))
        np.testing.assert_array_equal(shifted[f], 1024 + code)
    for w in codes.reshape(64, 4):
        for f in range(8 // bits):
            outs = _run_ptx(_asm_source(bits, f), int.from_bytes(w.tobytes(), "little"), "$2")
            assert len(outs) == 2
            halves = np.frombuffer(np.array(outs, np.uint32).tobytes(), np.uint16)
            want = fields[f][w.astype(np.int64)].view(np.uint16)
            np.testing.assert_array_equal(halves, want)
