"""Every code block of README.md runs (issue 19, item 4).

The ```python blocks are executed as written, in order, in one namespace (the real SmolLM2: this is
also the chat-answer check). Every `python -m kvjax ...` line of the ```bash blocks is parsed by the
CLI's own parser and its cheap argument checks (no model load): options that do not exist or
values the CLI rejects fail here. `make` and `python -m train.locret` lines are exercised by the
Makefile itself and tests/test_locret.py.
"""
from __future__ import annotations

import pathlib
import re
import shlex

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _kvjax_commands() -> list[list[str]]:
    """Each `python -m kvjax ...` command of the bash blocks (continuation lines joined, comments
    dropped, `$(cat FILE)` replaced by a word) as an argv list without `python -m kvjax`."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if not line.startswith("python -m kvjax "):
                continue
            line = re.sub(r"\$\(cat [^)]*\)", "text", line)
            out.append(shlex.split(line)[3:])
    return out


def test_readme_python_blocks_run():
    blocks = _blocks("python")
    assert len(blocks) >= 2
    ns: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
    assert "Paris" in ns["out"].text[0], ns["out"].text[0]
    assert any("shrinks to 4" in n for n in ns["snap_out"].stats["notes"]), ns["snap_out"].stats["notes"]
    assert ns["snap_out"].stats["cache_bytes"] < ns["out"].stats["cache_bytes"] / 2
    assert any("no compression" in n for n in ns["chunked"].stats["notes"])
    assert ns["outs"]["scores"].shape[:3] == (ns["config"].n_layers, 1, ns["config"].n_kv_heads)


@pytest.mark.parametrize("argv", _kvjax_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_cli_commands_parse_and_validate(argv, tmp_path):
    from kvjax.cli import build_parser, check_generate_args, eval_config_from_args
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        check_generate_args(args)
    elif args.command == "eval":
        eval_config_from_args(args)


def test_readme_commands_found():
    cmds = _kvjax_commands()
    assert {c[0] for c in cmds} >= {"demo", "generate", "eval"}, cmds
