"""Query-aware sparse decode: selectors that pick, per decode step (or every few steps), the
tokens or pages each (batch, kv-head) attends to, over a full cache (see `base`).

    from kvjax.selection import make_selection
    sel = make_selection("quest", budget=1024)
    out = generate(params, config, prompts, 64, selection=sel)
"""
from __future__ import annotations

from kvjax.selection.a2ats import A2ATS
from kvjax.selection.base import (SelectiveCache, SelectState, read_bytes_per_step, sparse_attend, wrap)
from kvjax.selection.delta import Delta
from kvjax.selection.louiskv import LouisKV
from kvjax.selection.quest import Quest
from kvjax.selection.shadowkv import ShadowKV
from kvjax.selection.tokenselect import TokenSelect

SELECTIONS = {"quest": Quest, "tokenselect": TokenSelect, "shadowkv": ShadowKV, "delta": Delta, "a2ats": A2ATS,
              "louiskv": LouisKV}


def make_selection(name: str, budget: int = 1024, **kwargs):
    """A selector by name with a token budget per kv head (TokenSelect: n_init + top_k + n_local;
    selectors with `from_budget` split the budget into their sink / local / selected parts)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SELECTIONS:
        raise ValueError(f"unknown selection method {name!r}; expected one of {sorted(SELECTIONS)}")
    cls = SELECTIONS[key]
    if hasattr(cls, "from_budget"):
        return cls.from_budget(int(budget), **kwargs)
    return cls(budget=int(budget), **kwargs)


__all__ = ["SELECTIONS", "make_selection", "A2ATS", "Delta", "LouisKV", "Quest", "ShadowKV", "TokenSelect", "SelectiveCache", "SelectState",
           "read_bytes_per_step", "sparse_attend", "wrap"]
