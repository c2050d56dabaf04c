"""Parse a budget written on the command line (issue 19): `parse_budget(text) -> Budget`.

Accepted forms (surrounding whitespace ignored, suffixes case-insensitive):

    '0.25', '.25', '25%'         a kept ratio of the context, in (0, 1] (a percentage in (0, 100])
    '512', '512tok'              a token count per head (a whole number >= 1; the suffix may
                                 also be spelled 'token' or 'tokens')
    '1', '1.0', '100%'           ratio 1: the WHOLE context, not one token. A bare 1 is ambiguous
                                 between "ratio 1" and "1 token"; it is read as ratio 1 (keep
                                 everything, a no-op). Write '1tok' for a single token.

Rejected with a ValueError that names the two accepted forms: text that is not a number ('abc'),
zero or negative values, a non-integer above 1 ('1.5': neither a ratio nor a token count), a
percentage above 100% or not positive, a fractional token count ('2.5tok'), nan and infinities.
"""
from __future__ import annotations

import math

from kvjax.policies.base import Budget

FORMS = "use a ratio like 0.25 or 25% or a token count like 512"


def _number(body: str, text: str) -> float:
    try:
        v = float(body)
    except ValueError:
        raise ValueError(f"budget {text!r} is not a number: {FORMS}") from None
    if not math.isfinite(v):
        raise ValueError(f"budget {text!r} is not a finite number: {FORMS}")
    if v <= 0:
        raise ValueError(f"budget {text!r} must be positive: {FORMS}")
    return v


def parse_budget(text) -> Budget:
    """'0.25' / '25%' -> Budget(ratio=0.25); '512' / '512tok' -> Budget(tokens=512);
    exactly '1' (or '1.0', '100%') -> Budget(ratio=1.0), the whole context (see the module docstring).
    A number (int or float) is read as its text. Raises ValueError otherwise."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ValueError(f"budget {text!r} is not a number: {FORMS}")
    text = str(text)
    s = text.strip().lower()
    if s.endswith("%"):
        v = _number(s[:-1].strip(), text)
        if v > 100:
            raise ValueError(f"budget {text!r} is above 100% (a ratio is at most 1): {FORMS}")
        return Budget(ratio=v / 100)
    for suffix in ("tokens", "token", "tok"):
        if s.endswith(suffix):
            v = _number(s[: -len(suffix)].strip(), text)
            if not v.is_integer():
                raise ValueError(f"budget {text!r} is not a whole token count: {FORMS}")
            return Budget(tokens=int(v))
    v = _number(s, text)
    if v <= 1:
        return Budget(ratio=v)          # 1 itself: ratio 1, the whole context
    if not v.is_integer():
        raise ValueError(f"budget {text!r} is neither a ratio in (0, 1] nor a whole token count: {FORMS}")
    return Budget(tokens=int(v))
