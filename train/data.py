"""Deterministic (prompt, response) pairs from the King James Bible for training learned pieces.

Locret (arXiv 2410.01805) trains on LongAlpaca conversations: the user turn is the prompt, the
assistant turn the response. Offline we build the same shape from KJV text (`kvjax.eval.text`):

- "continuation": `prompt_len` tokens of running text, the response is the next `response_len`.
- "passkey": filler text with "The pass key is NNNNN." at a random depth; the prompt ends with
  the question, the response is the answer.
- "kv": several "Record XXXX has value NNNNNN." facts at random depths, one of them asked for.

Every prompt has exactly `prompt_len` tokens and every response `response_len` slots
(`response_mask` marks the real ones; answers are short), so batches have static shapes.
Example i depends only on (seed, split, i). The "train" split draws text from the first
`train_fraction` of the verses, "heldout" from the rest.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

KINDS = ("continuation", "passkey", "kv")
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """prompt_len / response_len: tokens; mix: fraction of each kind (continuation, passkey, kv);
    tokenizer: "smollm2" (the embedded GGUF's BPE) or "bytes" (UTF-8 bytes, for tiny test models)."""

    prompt_len: int = 1024
    response_len: int = 32
    mix: tuple[float, float, float] = (0.5, 0.25, 0.25)
    n_records: int = 6
    train_fraction: float = 0.9
    tokenizer: str = "smollm2"
    seed: int = 0

    def __post_init__(self):
        if self.prompt_len <= 0 or self.response_len <= 0:
            raise ValueError(f"prompt_len and response_len must be positive, got {self.prompt_len}, {self.response_len}")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix must be 3 non-negative fractions (continuation, passkey, kv), got {self.mix}")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")


@functools.lru_cache(maxsize=4)
def get_encoder(name: str) -> Callable[[str], list[int]]:
    if name == "bytes":
        return lambda text: list(text.encode("utf-8"))
    if name == "smollm2":
        from models.tokenizer import load_tokenizer
        tok = load_tokenizer("smollm2")
        return lambda text: list(tok.encode(text))
    raise ValueError(f"unknown tokenizer {name!r}; use 'smollm2' or 'bytes'")


@functools.lru_cache(maxsize=4)
def corpus_tokens(tokenizer: str, split: str, train_fraction: float) -> np.ndarray:
    """The split's KJV text as one token array (int32)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from kvjax.eval.text import kjv_verses
    verses = [v["text"] for v in kjv_verses()]
    cut = int(len(verses) * train_fraction)
    part = verses[:cut] if split == "train" else verses[cut:]
    enc = get_encoder(tokenizer)
    # encode in blocks of verses (fast, and block boundaries fall between verses)
    out: list[int] = []
    for i in range(0, len(part), 200):
        out.extend(enc(" " + " ".join(part[i:i + 200])))
    return np.asarray(out, np.int32)


def _kind_of(rng: np.random.Generator, mix) -> int:
    p = np.asarray(mix, np.float64)
    return int(rng.choice(3, p=p / p.sum()))


def _fill(corpus: np.ndarray, rng, n: int) -> np.ndarray:
    if n > len(corpus):
        raise ValueError(f"need {n} tokens of filler but the corpus split has {len(corpus)}")
    s = int(rng.integers(0, len(corpus) - n + 1))
    return corpus[s:s + n]


def _with_inserts(filler: np.ndarray, inserts: list[list[int]], rng) -> np.ndarray:
    """Insert token lists into `filler` at sorted random offsets."""
    offs = np.sort(rng.integers(0, len(filler) + 1, size=len(inserts)))
    parts, prev = [], 0
    for o, ins in zip(offs, inserts):
        parts += [filler[prev:o], np.asarray(ins, np.int32)]
        prev = o
    parts.append(filler[prev:])
    return np.concatenate(parts)


def make_example(cfg: DataConfig, split: str, i: int) -> dict:
    """One example: prompt [P] int32, response [R] int32, response_mask [R] bool, kind int."""
    corpus = corpus_tokens(cfg.tokenizer, split, cfg.train_fraction)
    enc = get_encoder(cfg.tokenizer)
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
    P, R = cfg.prompt_len, cfg.response_len
    kind = _kind_of(rng, cfg.mix)
    if kind == 0:
        window = _fill(corpus, rng, P + R)
        prompt, answer = window[:P], window[P:]
    else:
        if kind == 1:
            key = int(rng.integers(10000, 100000))
            inserts = [enc(f" The pass key is {key}. Remember it. {key} is the pass key.")]
            question = enc(" What is the pass key? The pass key is")
            answer = enc(f" {key}.")
        else:
            letters = np.array(list("ABCDEFGHJKLMNPQRSTUVWXYZ"))
            names = ["".join(rng.choice(letters, 4)) for _ in range(cfg.n_records)]
            values = [int(v) for v in rng.integers(100000, 1000000, size=cfg.n_records)]
            inserts = [enc(f" Record {k} has value {v}.") for k, v in zip(names, values)]
            j = int(rng.integers(0, cfg.n_records))
            question = enc(f" What is the value of record {names[j]}? The value of record {names[j]} is")
            answer = enc(f" {values[j]}.")
        n_fill = P - len(question) - sum(len(x) for x in inserts)
        if n_fill < 1 or len(answer) > R:
            raise ValueError(f"prompt_len={P} / response_len={R} too small for a {KINDS[kind]} example")
        prompt = np.concatenate([_with_inserts(_fill(corpus, rng, n_fill), inserts, rng),
                                 np.asarray(question, np.int32)])
        answer = np.asarray(answer, np.int32)
    response = np.zeros(R, np.int32)
    response[:len(answer)] = answer[:R]
    mask = np.zeros(R, bool)
    mask[:min(len(answer), R)] = True
    return {"prompt": prompt.astype(np.int32), "response": response, "response_mask": mask,
            "kind": np.int32(kind)}


def make_dataset(cfg: DataConfig, split: str, n: int, start: int = 0) -> dict:
    """Examples start..start+n-1 stacked: prompt [n, P], response [n, R], response_mask [n, R], kind [n]."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rows = [make_example(cfg, split, start + i) for i in range(n)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
