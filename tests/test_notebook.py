"""The Colab TPU notebook runs: its code cells, in order, in one namespace (no Jupyter needed).

Cells tagged `colab` (pip installs) are skipped; after the cell tagged `parameters` the test sets a
tiny model (an HF checkpoint it writes, with a word-level tokenizer over Bible words) and small
sizes, so every other cell runs as written: generate (full / SnapKV 25% / KIVI 4-bit), the
fidelity table and the plot.
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "kvjax_colab_tpu.ipynb"


def code_cells(path: pathlib.Path) -> list[tuple[str, tuple[str, ...]]]:
    """(source, tags) of every code cell, in order."""
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    return [("".join(c["source"]), tuple(c.get("metadata", {}).get("tags", ())))
            for c in nb["cells"] if c["cell_type"] == "code"]


def tiny_checkpoint(directory: pathlib.Path) -> pathlib.Path:
    """A 2-layer random Llama checkpoint (head_dim 32: KIVI's group) with a word-level tokenizer.json over Bible words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kvjax.eval.text import kjv_text
    from models.loading import save_safetensors
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", kjv_text("Genesis", n_chars=20000))))[:250]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}
    cfg = {"model_type": "llama", "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2}
    rng = np.random.default_rng(0)
    w = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    t = {"model.embed_tokens.weight": w(len(vocab), 64), "model.norm.weight": np.ones(64, np.float32)}
    for i in range(2):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(64, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(64, np.float32),
                  p + "self_attn.q_proj.weight": w(64, 64), p + "self_attn.k_proj.weight": w(32, 64),
                  p + "self_attn.v_proj.weight": w(32, 64), p + "self_attn.o_proj.weight": w(64, 64),
                  p + "mlp.gate_proj.weight": w(64, 64), p + "mlp.up_proj.weight": w(64, 64),
                  p + "mlp.down_proj.weight": w(64, 64)})
    save_safetensors(directory, cfg, t)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def test_notebook_structure():
    cells = code_cells(NOTEBOOK)
    tags = [t for _, t in cells]
    assert ("colab",) in tags and ("parameters",) in tags
    for src, t in cells:
        if "colab" not in t:     # everything CI runs is plain Python (no !shell or %magic lines)
            assert not re.search(r"^\s*[!%]", src, re.M), src


def test_notebook_runs_headless(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model_dir = str(tiny_checkpoint(tmp_path / "tiny"))
    small = dict(MODEL=model_dir, QUESTION="In the beginning God created the heaven", MAX_NEW_TOKENS=4,
                 CONTEXT_TOKENS=48, CONTINUATION_TOKENS=8, BUDGETS=(0.25,), POLICIES=("snapkv",))
    ns: dict = {"__name__": "__notebook__"}
    for src, tags in code_cells(NOTEBOOK):
        if "colab" in tags:
            continue
        exec(compile(src, f"{NOTEBOOK.name}", "exec"), ns)
        if "parameters" in tags:
            ns.update(small)
    plt.close("all")
    assert set(ns["outputs"]) == {"full cache", "SnapKV 25%", "KIVI 4-bit"}
    assert all(len(o.tokens[0]) >= 1 for o in ns["outputs"].values())
    rows = ns["rows"]
    assert len(rows) == 1 and all(np.isfinite(r["kl"]) and r["kl"] >= 0 for r in rows)
    full_mib = ns["full"]["cache_bytes"] / 2**20
    assert all(r["mib"] < full_mib for r in rows)         # compressed caches really are smaller
