"""Synthetic multi-passkey haystacks over KJV text: DuoAttention's training data, offline.

DuoAttention (`duo_attn/data.py::MultiplePasskeyRetrievalDataset`) hides `n_passkeys` passkeys of
`n_words` random NATO-alphabet words in a BookSum haystack, at sorted random depths drawn from
linspace(0.05, 0.95, 1000), then asks for every passkey in turn; only the answer words are
labelled. Here the haystack is King James Bible text (`train.data.corpus_tokens`, public domain)
and every example has exactly one of `n_lengths` context lengths from linspace(min_len, max_len)
(official: 50 lengths over 1000..32000), so a run compiles at most `n_lengths` shapes.

Example i is a pure function of (seed, split, i, T): `make_example(cfg, split, i, T)` ->
    tokens [T] int32, label_mask [T] bool (True on the answer words' tokens);
`make_batch(cfg, split, step, batch_size)` draws one length per step (a pure function of the step).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from train.data import SPLITS, corpus_tokens, get_encoder

NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
        "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
        "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth")


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
    """Official: 10 passkeys of 32 words, depths 5-95%, lengths linspace(1000, 32000, 50)."""

    n_passkeys: int = 10
    n_words: int = 32
    min_len: int = 1000
    max_len: int = 32000
    n_lengths: int = 50
    tokenizer: str = "smollm2"
    train_fraction: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.n_passkeys <= len(ORDINALS):
            raise ValueError(f"n_passkeys must be in [1, {len(ORDINALS)}], got {self.n_passkeys}")
        if self.n_words <= 0 or self.n_lengths <= 0:
            raise ValueError(f"n_words and n_lengths must be positive, got {self.n_words}, {self.n_lengths}")
        if not 0 < self.min_len <= self.max_len:
            raise ValueError(f"need 0 < min_len <= max_len, got {self.min_len}, {self.max_len}")

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.linspace(self.min_len, self.max_len, self.n_lengths).round())


def make_example(cfg: PasskeyConfig, split: str, i: int, total: int) -> dict:
    """tokens [total] int32, label_mask [total] bool on the answer tokens."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    enc = get_encoder(cfg.tokenizer)
    corpus = corpus_tokens(cfg.tokenizer, split, cfg.train_fraction)
    rng = np.random.default_rng([cfg.seed, 7, SPLITS.index(split), i])
    keys = [" ".join(rng.choice(NATO, cfg.n_words)) for _ in range(cfg.n_passkeys)]
    needles = [enc(f" Remember this sequence of words, it's the {ORDINALS[j]} passkey to the vault: {k}.")
               for j, k in enumerate(keys)]
    qa, mask = [], []
    for j, k in enumerate(keys):
        q = enc(f" What is the {ORDINALS[j]} passkey to the vault? The {ORDINALS[j]} passkey is")
        a = enc(f" {k}.")
        qa += q + a
        mask += [False] * len(q) + [True] * len(a)
    n_fill = total - len(qa) - sum(map(len, needles))
    if n_fill < 1:
        raise ValueError(f"a context of {total} tokens cannot hold {cfg.n_passkeys} passkeys of {cfg.n_words} "
                         f"words ({total - n_fill} tokens): raise min_len or lower n_passkeys / n_words")
    if n_fill > len(corpus):
        raise ValueError(f"need {n_fill} filler tokens but the corpus split has {len(corpus)}")
    s = int(rng.integers(0, len(corpus) - n_fill + 1))
    filler = corpus[s:s + n_fill]
    depths = np.sort(rng.choice(np.linspace(0.05, 0.95, 1000), cfg.n_passkeys))
    cuts = (depths * n_fill).astype(int)
    parts, prev = [], 0
    for c, needle in zip(cuts, needles):
        parts += [filler[prev:c], np.asarray(needle, np.int32)]
        prev = c
    parts += [filler[prev:], np.asarray(qa, np.int32)]
    tokens = np.concatenate(parts).astype(np.int32)
    label_mask = np.zeros(total, bool)
    label_mask[total - len(qa):] = mask
    return {"tokens": tokens, "label_mask": label_mask}


def make_batch(cfg: PasskeyConfig, split: str, step: int, batch_size: int) -> dict:
    """Examples step*B .. step*B+B-1 at one length drawn for the step: tokens [B, T], label_mask [B, T]."""
    rng = np.random.default_rng([cfg.seed, 11, SPLITS.index(split), step])
    total = cfg.lengths[int(rng.integers(0, cfg.n_lengths))]
    rows = [make_example(cfg, split, step * batch_size + j, total) for j in range(batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
