"""The demo's side-by-side: one prompt answered with the full cache and with compressed caches,
each compressed answer scored by its KL to the full cache on the full cache's answer tokens.

`python -m kvjax demo` hides a passkey in ~1.2K tokens of Bible text and asks for it. At 25% of the
cache, SnapKV (scores from the last 64 prompt queries) answers a wrong number on SmolLM2-135M while
H2O (attention accumulated over every prompt query) keeps it (issue 19, item 3): the comparison
prints both with the KL and the cache memory, so compression is shown keeping the answer next to
a setting where it does not.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from kvjax.compression import Compression
from kvjax.eval.fidelity import continuation_logits, fidelity_metrics, prefill_context
from models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Compared:
    """One row of the side-by-side. kl / kl_max: nats per answer token (mean / largest) of the
    compressed cache's next-token distribution against the full cache's, teacher-forced on the full
    cache's answer; cache_bytes: the cache after the prompt and the answer; answer: the compressed
    cache's own greedy answer; correct: whether it contains `expected` (None when none given)."""

    name: str
    answer: str
    correct: Optional[bool]
    kl: float
    kl_max: float
    cache_bytes: int
    notes: tuple[str, ...] = ()


def answer_tokens(tokenizer, tokens: Sequence[int]) -> list[int]:
    """The generated ids without the stop token(s) at the end (the tokens to teacher-force)."""
    out = list(tokens)
    while out and out[-1] in tokenizer.stop_ids:
        out.pop()
    return out


def compare_caches(params, config: ModelConfig, tokenizer, prompt_ids: Sequence[int],
                   methods: dict[str, Optional[Compression]], *, max_new_tokens: int = 32,
                   expected: Optional[str] = None, attention: str = "auto") -> list[Compared]:
    """Answer `prompt_ids` with every cache in `methods` (name -> Compression, None = the full cache,
    which must be present: it is the reference) and score each against the full cache.

    Raises ValueError when no full-cache entry is given or the full cache answers nothing."""
    from kvjax.generate import generate
    if not any(c is None for c in methods.values()):
        raise ValueError("compare_caches needs the full cache (a None entry) as its reference")
    ids = list(prompt_ids)
    full = generate(params, config, [ids], max_new_tokens, tokenizer=tokenizer, pad_id=tokenizer.pad_id,
                    attention=attention)
    target = answer_tokens(tokenizer, full.tokens[0])
    if not target:
        raise ValueError("the full cache answered nothing (EOS first): no answer tokens to score against")
    ctx, tgt = jnp.asarray([ids], jnp.int32), jnp.asarray([target], jnp.int32)
    ref = prefill_context(params, config, ctx, None, len(target), attention=attention)
    full_logits, _, _ = continuation_logits(params, config, ref, tgt, stepwise=False, attention=attention)
    rows = []
    for name, comp in methods.items():
        res = full if comp is None else generate(params, config, [ids], max_new_tokens, tokenizer=tokenizer,
                                                 pad_id=tokenizer.pad_id, compression=comp, attention=attention)
        if comp is None:
            logits, cache, notes = full_logits, None, ()
        else:
            pre = prefill_context(params, config, ctx, comp, len(target), attention=attention)
            logits, _, cache = continuation_logits(params, config, pre, tgt, stepwise=comp.when == "decode",
                                                   attention=attention)
            notes = tuple(pre.notes)
        m = fidelity_metrics(full_logits, logits, tgt)
        text = res.text[0]
        rows.append(Compared(name, text, None if expected is None else expected in text, m["kl"], m["kl_max"],
                             int(res.stats["cache_bytes"]), notes + tuple(res.stats["notes"])))
    return rows


def format_compared(row: Compared, full_bytes: int) -> str:
    verdict = "" if row.correct is None else ("  [answer kept]" if row.correct else "  [answer LOST]")
    return (f"{row.name:<22} KL {row.kl:.4f} nats/token (max {row.kl_max:.3f}) | cache "
            f"{row.cache_bytes / 2**20:.1f} MiB ({row.cache_bytes / full_bytes:.0%} of full){verdict}\n"
            f"    {row.answer.strip()}")
