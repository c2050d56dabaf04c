"""`python -m train.nsa` on a tiny random model with byte tokens: the loss decreases, the export
loads back (and reproduces the trained student's logits), a finished run resumes as a no-op."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.nsa import NSAConfig, nsa_forward_jit
from models.nsa_weights import load_nsa
from train.loop import TrainConfig
from train.nsa import NSATrainConfig, load_backbone, run

NSA = NSAConfig(kernel_size=8, kernel_stride=4, block_size=8, top_n=3, init_blocks=1, local_blocks=1, window=16)


def _cfg(steps):
    return NSATrainConfig(model="tiny", tiny=(("d_model", 32), ("ffn_dim", 64)), nsa=NSA, seq_len=48,
                          train=TrainConfig(steps=steps, batch_size=2, lr=3e-3, warmup_steps=3, dtype="float32",
                                            log_every=1, ckpt_every=20))


def test_train_nsa_smoke_loss_decreases_export_resume(tmp_path):
    cfg = _cfg(20)
    summary, trained = run(cfg, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert summary["tokens"] == 20 * 2 * 48
    config, _ = load_backbone(cfg)
    nsa_cfg, nsa, backbone = load_nsa(tmp_path / "nsa", config)
    assert nsa_cfg == NSA and backbone is not None
    toks = jnp.asarray(np.arange(48)[None] % 256, jnp.int32)
    got = nsa_forward_jit(backbone, nsa, toks, config, nsa_cfg)
    want = nsa_forward_jit(trained["backbone"], {int(i): p for i, p in trained["nsa"].items()}, toks, config, NSA)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    # the run is complete: a second call restores the step-20 checkpoint and trains nothing
    _, again = run(cfg, tmp_path, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="trained for model"):
        import dataclasses
        load_nsa(tmp_path / "nsa", dataclasses.replace(config, name="other"))


def test_train_config_errors(tmp_path):
    with pytest.raises(ValueError, match="trainable"):
        NSATrainConfig(trainable="heads")
    with pytest.raises(ValueError, match="seq_len"):
        NSATrainConfig(seq_len=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_nsa(tmp_path / "missing", load_backbone(_cfg(1))[0])
