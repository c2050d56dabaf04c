"""Needle tasks: passkey retrieval and key-value retrieval, scored beyond exact match.

- passkey: the task of Mohtashami & Jaggi, "Landmark Attention" (arXiv 2305.16300): a random
  number hidden in repetitive filler ("The grass is green. The sky is blue. ..."), then
  "What is the pass key? The pass key is" and the digits as the answer.
- kv: key-value retrieval after Liu et al., "Lost in the Middle" (arXiv 2307.03172), in the
  multi-key needle form of RULER (Hsieh et al., arXiv 2404.06654): several sentences "The value of
  key 4821 is apple." hidden in the same filler, then one key is asked; the answer is its value.
  (A dense JSON of UUID pairs is far beyond a 135M model: measured 0/6 exact at 1K tokens.)

Scoring (DESIGN.md §Evaluation), teacher-forced on the answer tokens after the prompt:
  logprob  sum of log p(answer token | prompt, previous answer tokens) [nats]
  acc      fraction of answer tokens that are the argmax
  exact    1 if every answer token is the argmax. Greedy decoding emits token i+1 only after
           emitting tokens 1..i, so greedy decoding of len(answer) tokens reproduces the answer
           exactly iff every teacher-forced argmax is right: `exact` IS greedy exact match
           (tests check it against `kvjax.generate.generate`).

Samples are built token by token from separately tokenized segments, so the needle's token span
is known exactly, every sample of a task has exactly `n_tokens` prompt tokens (so a batch needs no
padding), and generation is deterministic given the seed. SmolLM2-135M retrieves reliably only up
to ~1.5K tokens with repetitive filler and the needle at depth >= 0.5, so the defaults are
~1K tokens and depths in [0.5, 0.9].
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                  " There and back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is {key}"

KV_INTRO = ("There are important keys and values hidden inside a lot of irrelevant text. Find them and "
            "memorize them. I will quiz you about the value of one key.")
KV_PAIR = " The value of key {key} is {value}."
KV_QUESTION = "\nWhat is the value of key {key}? The value of key {key} is {value}"

WORDS = ("apple", "river", "candle", "garden", "silver", "mountain", "window", "thunder", "violin", "harbor",
         "pepper", "castle", "meadow", "rocket", "lantern", "pillow", "forest", "button", "dragon", "marble",
         "tiger", "anchor", "basket", "copper", "desert", "feather", "glacier", "hammer", "island", "jacket",
         "kettle", "lemon", "mirror", "needle", "orange", "parrot", "quartz", "rabbit", "saddle", "tunnel",
         "velvet", "walnut", "yellow", "zebra", "bridge", "cotton", "engine", "falcon", "ginger", "helmet",
         "insect", "jungle", "kitten", "ladder", "magnet", "napkin", "oyster", "planet", "ribbon", "spider",
         "turtle", "wagon", "winter", "summer")


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    """One task instance.

    prompt: token ids (exactly the requested length); answer: token ids that follow the prompt;
    answer_text: the answer as text; needle: (start, end) token span of the needle inside the
    prompt (the passkey sentence / the target key-value pair); depth: start / len(prompt);
    question: index where the trailing question starts (prompt[:question] is the haystack)."""

    kind: str
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    answer_text: str
    needle: tuple[int, int]
    depth: float
    seed: int
    question: int = -1

    @property
    def question_len(self) -> int:
        """Tokens of the trailing question (prompt[question:])."""
        return len(self.prompt) - self.question


def _split_answer(tokenizer, question_and_answer: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokenize question+answer jointly (as the model would see it) and split off the shortest
    token suffix that decodes to the answer (leading spaces stay with the question)."""
    ids = tokenizer.encode(question_and_answer)
    want = answer.strip()
    for k in range(len(ids) - 1, -1, -1):
        if tokenizer.decode(ids[k:]).strip() == want:
            return ids[:k], ids[k:]
    raise ValueError(f"cannot locate the answer {answer!r} in the tokenization of {question_and_answer!r}")


def _assemble(tokenizer, n_tokens: int, intro: list[int], units: list[list[int]], needle: list[int],
              question: list[int], depth: float, cycle: bool) -> tuple[list[int], tuple[int, int]]:
    """intro + newline padding + units[:i] + needle + units[i:j] + question with exactly n_tokens.

    units are whole filler sentences / key-value pairs (repeated in order if `cycle`); the needle
    goes at the unit boundary nearest `depth` of the prompt; the leftover (< one unit) is filled
    with newline tokens right after the intro."""
    fixed = len(intro) + len(needle) + len(question)
    room = n_tokens - fixed
    if room < 0:
        raise ValueError(f"n_tokens={n_tokens} is too short for the task ({fixed} fixed tokens)")
    chosen, size = [], 0
    while cycle or len(chosen) < len(units):
        unit = units[len(chosen) % len(units)]
        if size + len(unit) > room:
            break
        chosen.append(unit)
        size += len(unit)
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError("the tokenizer must encode a newline as one token")
    pad = newline * (room - size)
    head = len(intro) + len(pad)
    # place the needle at the unit boundary nearest the requested depth
    bounds = np.cumsum([0] + [len(u) for u in chosen])
    target = depth * n_tokens - head
    i = int(np.argmin(np.abs(bounds - target)))
    body_before = [t for u in chosen[:i] for t in u]
    body_after = [t for u in chosen[i:] for t in u]
    prompt = intro + pad + body_before + needle + body_after + question
    start = head + len(body_before)
    assert len(prompt) == n_tokens
    return prompt, (start, start + len(needle))


def text_filler(text: str, max_sentences: int = 400, max_words: int = 60) -> tuple[str, ...]:
    """Filler sentences from a user's text (each with a leading space, whitespace collapsed): the
    first `max_sentences` sentences of at most `max_words` words, split after . ! ? or a line
    break. ValueError if the text has none."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    out = []
    for part in parts:
        words = part.split()
        if words and len(words) <= max_words:
            out.append(" " + " ".join(words))
        if len(out) == max_sentences:
            break
    if not out:
        raise ValueError(f"no sentences of at most {max_words} words in the text for the needle filler")
    return tuple(out)


def passkey_sample(tokenizer, n_tokens: int = 1024, depth: float = 0.6, seed: int = 0,
                   digits: int = 5, filler: Sequence[str] = PASSKEY_FILLER) -> NeedleSample:
    """A passkey prompt of exactly `n_tokens` tokens with the needle at ~`depth` (0..1), hidden in
    `filler` sentences (repeated in order as needed; default: the paper's repetitive filler)."""
    _check(n_tokens, depth)
    rng = np.random.RandomState(seed)
    key = str(rng.randint(10 ** (digits - 1), 10 ** digits))
    intro = tokenizer.encode(PASSKEY_INTRO)
    units = [tokenizer.encode(s) for s in filler]
    needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
    question, answer = _split_answer(tokenizer, PASSKEY_QUESTION.format(key=key), key)
    prompt, span = _assemble(tokenizer, n_tokens, intro, units, needle, question, depth, cycle=True)
    return NeedleSample("passkey", tuple(prompt), tuple(answer), key, span, span[0] / n_tokens, seed,
                        n_tokens - len(question))


def kv_sample(tokenizer, n_tokens: int = 1024, depth: float = 0.6, seed: int = 0,
              n_distractors: int = 3, filler: Sequence[str] = PASSKEY_FILLER) -> NeedleSample:
    """A key-value retrieval prompt of exactly `n_tokens` tokens: `n_distractors` + 1 pairs
    "The value of key 4821 is apple." in repetitive filler; the asked pair sits at ~`depth`,
    the distractors at random sentence boundaries. Keys: distinct 4-digit numbers; values:
    distinct words from `WORDS`."""
    _check(n_tokens, depth)
    if not 0 <= n_distractors < len(WORDS):
        raise ValueError(f"n_distractors must be in [0, {len(WORDS) - 1}], got {n_distractors}")
    rng = np.random.RandomState(seed)
    keys = rng.choice(np.arange(1000, 10000), size=n_distractors + 1, replace=False)
    values = rng.choice(len(WORDS), size=n_distractors + 1, replace=False)
    key, value = str(keys[0]), WORDS[values[0]]
    intro = tokenizer.encode(KV_INTRO)
    needle = tokenizer.encode(KV_PAIR.format(key=key, value=value))
    pairs = [tokenizer.encode(KV_PAIR.format(key=str(k), value=WORDS[v])) for k, v in zip(keys[1:], values[1:])]
    question, answer = _split_answer(tokenizer, KV_QUESTION.format(key=key, value=value), value)
    room = n_tokens - len(intro) - len(needle) - len(question) - sum(len(p) for p in pairs)
    sentences = [tokenizer.encode(s) for s in filler]
    filler, size = [], 0
    while size < room:
        filler.append(sentences[len(filler) % len(sentences)])
        size += len(filler[-1])
    # distractors at random boundaries, never after the last filler sentence (which may not fit)
    slots = np.sort(rng.choice(max(len(filler) - 1, 1), size=len(pairs), replace=True))
    units, j = [], 0
    for i, sent in enumerate(filler):
        while j < len(pairs) and slots[j] == i:
            units.append(pairs[j])
            j += 1
        units.append(sent)
    units[len(units):] = pairs[j:]
    prompt, span = _assemble(tokenizer, n_tokens, intro, units, needle, question, depth, cycle=False)
    return NeedleSample("kv", tuple(prompt), tuple(answer), value, span, span[0] / n_tokens, seed,
                        n_tokens - len(question))


TASKS = {"passkey": passkey_sample, "kv": kv_sample}


def _check(n_tokens: int, depth: float) -> None:
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def make_samples(tokenizer, kinds: Sequence[str] = ("passkey", "kv"), n_per_kind: int = 2,
                 n_tokens: int = 1024, depths: tuple[float, float] = (0.5, 0.9), seed: int = 0,
                 filler: Sequence[str] = PASSKEY_FILLER) -> list[NeedleSample]:
    """`n_per_kind` samples of every task kind, depths spread evenly over `depths`, all of exactly
    `n_tokens` prompt tokens, hidden in `filler` sentences (e.g. `text_filler(user_text)`);
    deterministic in `seed`."""
    if n_per_kind <= 0:
        raise ValueError(f"n_per_kind must be positive, got {n_per_kind}")
    lo, hi = depths
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"depths must satisfy 0 <= lo <= hi <= 1, got {depths}")
    out = []
    for k, kind in enumerate(kinds):
        if kind not in TASKS:
            raise ValueError(f"unknown needle task {kind!r}; known: {sorted(TASKS)}")
        for i in range(n_per_kind):
            depth = lo if n_per_kind == 1 else lo + (hi - lo) * i / (n_per_kind - 1)
            out.append(TASKS[kind](tokenizer, n_tokens=n_tokens, depth=depth, seed=seed * 1000 + 100 * k + i,
                                   filler=filler))
    return out


def answer_batch(samples: Sequence[NeedleSample], query_aware: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token arrays for a batch: (context [n, T'], targets [n, F], mask [n, F] bool).

    query_aware=True: the context is the whole prompt (question included, so the compression can
    see it, as SnapKV intends) and targets are the answers (right-padded with 0).
    query_aware=False (kvpress's default): the context stops before the longest question of the
    batch, and targets = the rest of the prompt + the answer, fed over the compressed cache; the
    mask marks only answer tokens for scoring. Note that with query-aware compression the first
    answer token is predicted by the prefill itself, before any compression."""
    lens = {len(s.prompt) for s in samples}
    if len(lens) != 1:
        raise ValueError(f"samples must share one prompt length, got {sorted(lens)}")
    n = lens.pop()
    q = 0 if query_aware else max(s.question_len for s in samples)
    a = max(len(s.answer) for s in samples)
    targets = np.zeros((len(samples), q + a), np.int32)
    mask = np.zeros((len(samples), q + a), bool)
    for i, s in enumerate(samples):
        targets[i, :q] = s.prompt[n - q:]
        targets[i, q:q + len(s.answer)] = s.answer
        mask[i, q:q + len(s.answer)] = True
    return np.asarray([s.prompt[:n - q] for s in samples], np.int32), targets, mask


def score_answers(logits, answers, mask) -> dict:
    """Per-sample scores from teacher-forced logits [n, A, vocab] (logits[:, i] predicts answers[:, i]).

    returns numpy arrays of length n: logprob (sum over answer tokens, nats), acc, exact."""
    logits = jnp.asarray(logits, jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = np.asarray(jnp.take_along_axis(lp, jnp.asarray(answers)[..., None], axis=-1)[..., 0], np.float64)
    hit = np.asarray(jnp.argmax(logits, axis=-1)) == np.asarray(answers)
    mask = np.asarray(mask, bool)
    n = mask.sum(1)
    return {"logprob": np.where(mask, tok_lp, 0.0).sum(1), "acc": (hit & mask).sum(1) / n,
            "exact": np.all(hit | ~mask, axis=1).astype(np.float64)}
