"""parse_budget: the command-line budget forms (issue 19)."""
from __future__ import annotations

import pytest

from kvjax.budget_parse import parse_budget
from kvjax.policies.base import Budget

FORMS = "use a ratio like 0.25 or 25% or a token count like 512"


@pytest.mark.parametrize("text, budget", [
    ("0.25", Budget(ratio=0.25)),
    (".25", Budget(ratio=0.25)),
    ("25%", Budget(ratio=0.25)),
    (" 25 % ", Budget(ratio=0.25)),
    ("12.5%", Budget(ratio=0.125)),
    ("100%", Budget(ratio=1.0)),
    ("512", Budget(tokens=512)),
    ("512tok", Budget(tokens=512)),
    ("512 TOK", Budget(tokens=512)),
    ("512tokens", Budget(tokens=512)),
    ("1tok", Budget(tokens=1)),
    ("2", Budget(tokens=2)),
    ("1e3", Budget(tokens=1000)),
    ("512.0", Budget(tokens=512)),
    (0.5, Budget(ratio=0.5)),
    (256, Budget(tokens=256)),
])
def test_accepted_forms(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["1", "1.0", "1.00", 1, 1.0])
def test_one_is_the_whole_context(text):
    """A bare 1 is ratio 1 (keep everything), not one token: documented; '1tok' is one token."""
    b = parse_budget(text)
    assert b == Budget(ratio=1.0) and b.kept(1000) == 1000


def test_not_a_number_names_both_forms():
    with pytest.raises(ValueError) as e:
        parse_budget("abc")
    assert str(e.value) == f"budget 'abc' is not a number: {FORMS}"


@pytest.mark.parametrize("text", ["1.5", "2.5", "512.25"])
def test_non_integer_above_one_is_rejected(text):
    with pytest.raises(ValueError, match="neither a ratio in \\(0, 1\\] nor a whole token count") as e:
        parse_budget(text)
    assert "0.25 or 25%" in str(e.value) and "512" in str(e.value)


@pytest.mark.parametrize("text", ["0", "0.0", "-0.25", "-512", "0%", "-5%", "0tok", "-3tok"])
def test_zero_and_negative_are_rejected(text):
    with pytest.raises(ValueError, match="must be positive") as e:
        parse_budget(text)
    assert FORMS in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("150%", "above 100%"),
    ("100.5%", "above 100%"),
    ("2.5tok", "not a whole token count"),
    ("tok", "not a number"),
    ("%", "not a number"),
    ("", "not a number"),
    ("0.25x", "not a number"),
    ("nan", "not a finite number"),
    ("inf", "not a finite number"),
    (None, "not a number"),
    (True, "not a number"),
])
def test_other_invalid_forms(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_budget(text)
    assert FORMS in str(e.value)
