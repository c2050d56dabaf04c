"""Tokenizer built from a GGUF file's metadata (or an HF `tokenizer.json`), plus the ChatML template.

The embedded SmolLM2 GGUF carries a GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`,
pre-tokenizer `smollm`). llama.cpp's `smollm` pre-tokenizer splits every digit on its own before the
GPT-2 regex, which is what HF's tokenizer.json for SmolLM2 does with
`Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]`; we rebuild exactly that
with the `tokenizers` library. Control tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, ...) are
registered as special tokens so they are matched whole in text and can be skipped on decode.

    tok = load_tokenizer("smollm2")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    text = tok.decode(ids, skip_special_tokens=True)
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Optional, Sequence, Union

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

PathLike = Union[str, os.PathLike]

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
SPACE = "\u2581"   # SentencePiece's word-boundary mark
# llama.cpp pre-tokenizer names that are GPT-2 byte-level BPE with individual digits split first.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
PLAIN_GPT2_PRE = ("default", "gpt-2", "gpt2")
DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>")


@dataclasses.dataclass(frozen=True)
class ChatML:
    """The ChatML chat format used by SmolLM2 and Qwen: `<|im_start|>role\\ncontent<|im_end|>\\n`.

    default_system: inserted as the first turn when the conversation has no system message
    (SmolLM2's template does this); None inserts nothing."""

    default_system: Optional[str] = None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise ValueError("chat template needs at least one message")
        turns = list(messages)
        if self.default_system is not None and turns[0].get("role") != "system":
            turns.insert(0, {"role": "system", "content": self.default_system})
        out = []
        for m in turns:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message needs 'role' and 'content', got {sorted(m)}")
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the ids the generate loop needs and a chat template."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: Optional[int], eos_id: Optional[int],
                 pad_id: Optional[int], add_bos: bool, chat: Optional[ChatML], stop_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.add_bos, self.chat = bos_id, eos_id, add_bos, chat
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.stop_ids = tuple(sorted({i for i in (eos_id, *stop_ids) if i is not None}))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation as text (encode it with `encode`)."""
        if self.chat is None:
            raise ValueError("this tokenizer has no chat template (the model is not a chat model)")
        return self.chat.render(messages, add_generation_prompt)


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in PLAIN_GPT2_PRE:
        return byte_level
    raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                              f"{DIGIT_SPLIT_PRE + PLAIN_GPT2_PRE})")


def chat_from_template(template: Optional[str]) -> Optional[ChatML]:
    """ChatML settings from a Jinja chat template string (only ChatML templates are supported)."""
    if not template or "<|im_start|>" not in template:
        return None
    m = DEFAULT_SYSTEM_RE.search(template.replace("\n", "\\n"))
    return ChatML(default_system=m.group(1) if m else None)


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary (which has scores, not merges):
    SentencePiece joins the adjacent pair whose joined piece scores highest, so every split of a
    normal piece into two vocabulary pieces is a merge, ranked by the joined piece's score
    (ties by the pieces' ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(meta) -> Tokenizer:
    """A SentencePiece BPE model (GGUF tokenizer model "llama", e.g. Gemma 3) with byte fallback:
    spaces become U+2581 and split words (no dummy prefix unless the file asks for one)."""
    if len(meta.scores) != len(meta.tokens):
        raise ValueError("GGUF SentencePiece tokenizer has no scores (tokenizer.ggml.scores)")
    vocab = {tok: i for i, tok in enumerate(meta.tokens)}
    unk = meta.tokens[meta.unk_id] if meta.unk_id is not None else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(meta.tokens, meta.scores, meta.token_types),
                              unk_token=unk, fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", SPACE)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tk


def tokenizer_from_gguf(path: PathLike) -> TextTokenizer:
    """Rebuild the GGUF's tokenizer: GPT-2 byte-level BPE ("gpt2") or SentencePiece BPE ("llama")."""
    from models.loading import load_gguf_tokenizer_metadata
    meta = load_gguf_tokenizer_metadata(path)
    if meta.model not in ("gpt2", "llama"):
        raise NotImplementedError(f"{path}: tokenizer model {meta.model!r} is not supported "
                                  f"(only 'gpt2' BPE and 'llama' SentencePiece BPE)")
    vocab = {tok: i for i, tok in enumerate(meta.tokens)}
    if meta.model == "llama":
        tk = _sentencepiece_bpe(meta)
    else:
        merges = [tuple(m.split(" ", 1)) for m in meta.merges]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = _pre_tokenizer(meta.pre)
        tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(meta.tokens, meta.token_types) if kind == CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(meta.tokens, meta.token_types) if kind == USER_DEFINED]
    tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    chat = chat_from_template(meta.chat_template)
    stop = [vocab["<|im_end|>"]] if chat is not None and "<|im_end|>" in vocab else []
    if "<end_of_turn>" in vocab:                 # Gemma's end of a turn
        stop.append(vocab["<end_of_turn>"])
    if meta.eot_id is not None:
        stop.append(meta.eot_id)
    return TextTokenizer(tk, bos_id=meta.bos_id, eos_id=meta.eos_id, pad_id=meta.pad_id,
                         add_bos=meta.add_bos, chat=chat, stop_ids=stop)


def tokenizer_from_hf(directory: PathLike) -> TextTokenizer:
    """An HF checkpoint directory's `tokenizer.json` (+ `tokenizer_config.json` for ids/template)."""
    d = pathlib.Path(directory)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    cfg = {}
    if (d / "tokenizer_config.json").exists():
        cfg = json.loads((d / "tokenizer_config.json").read_text())

    def tid(name):
        tok = cfg.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return None if tok is None else tk.token_to_id(tok)

    chat = chat_from_template(cfg.get("chat_template"))
    stop = [tk.token_to_id("<|im_end|>")] if chat is not None else []
    return TextTokenizer(tk, bos_id=tid("bos_token"), eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                         add_bos=bool(cfg.get("add_bos_token", False)), chat=chat,
                         stop_ids=[s for s in stop if s is not None])


def load_tokenizer(name_or_path: PathLike) -> TextTokenizer:
    """Tokenizer for a preset name ("smollm2", "gemma3-270m"), a GGUF file, or an HF directory with tokenizer.json."""
    from models.loading import find_smollm2_gguf
    s = str(name_or_path)
    if s in ("smollm2", "smollm2-135m"):
        return tokenizer_from_gguf(find_smollm2_gguf())
    from models import gemma3
    if s.lower() in gemma3.NAMES:
        found = gemma3.find_checkpoint()
        return tokenizer_from_gguf(found) if found.suffix == ".gguf" else tokenizer_from_hf(found)
    p = pathlib.Path(s)
    if p.is_file() and p.suffix == ".gguf":
        return tokenizer_from_gguf(p)
    if p.is_dir() and (p / "tokenizer.json").exists():
        return tokenizer_from_hf(p)
    if p.is_dir():
        raise FileNotFoundError(f"{p} has no tokenizer.json")
    raise ValueError(f"no tokenizer for {s!r}: give 'smollm2', a .gguf file, or an HF directory with tokenizer.json")
