"""`python -m kvjax eval` defaults on a user's text (issue 19, item 2) and clear input errors
(items 5, 7), all checked before any model is loaded (the SmolLM2 tokenizer only)."""
from __future__ import annotations

import pathlib

import pytest

from kvjax.cli import build_parser, eval_tokens, fresh_run_dir, main
from kvjax.eval.needle import PASSKEY_FILLER, make_samples, text_filler
from kvjax.eval.text import kjv_text, read_text_file

SENTENCES = [f"The lamp number {i} stood beside the old mill near the river." for i in range(120)]


def _args(*argv):
    return build_parser().parse_args(["eval", *argv])


def test_default_out_is_a_fresh_run_dir_not_docs(tmp_path):
    assert _args().out is None                                   # was "docs/eval"
    first = pathlib.Path(fresh_run_dir(str(tmp_path / "runs")))
    assert not first.exists() and first.parent == tmp_path / "runs"
    first.mkdir(parents=True)
    assert pathlib.Path(fresh_run_dir(str(tmp_path / "runs"))) != first


def test_context_and_continuation_derived_from_a_short_file(tmp_path, smollm2_tokenizer):
    path = tmp_path / "my.txt"
    path.write_text(" ".join(SENTENCES[:50]), encoding="utf-8")
    n = len(smollm2_tokenizer.encode(path.read_text()))
    assert 300 < n < 1600 + 128                                  # the old default 1600 + 128 rejected it
    notes = []
    ctx, cont = eval_tokens(_args("--text-file", str(path)), smollm2_tokenizer, notes)
    assert len(cont) == n // 8 and len(ctx) == n - n // 8
    assert "context" in notes[0] and str(n) in notes[0]
    ctx, cont = eval_tokens(_args("--text-file", str(path), "--continuation-tokens", "20"), smollm2_tokenizer, [])
    assert (len(ctx), len(cont)) == (n - 20, 20)
    with pytest.raises(ValueError, match="lower --context-tokens"):
        eval_tokens(_args("--text-file", str(path), "--context-tokens", str(n)), smollm2_tokenizer, [])


def test_separate_context_and_continuation_files(tmp_path, smollm2_tokenizer):
    (tmp_path / "c.txt").write_text(" ".join(SENTENCES[:20]), encoding="utf-8")
    (tmp_path / "n.txt").write_text(" ".join(SENTENCES[20:23]), encoding="utf-8")
    ctx, cont = eval_tokens(_args("--context-file", str(tmp_path / "c.txt"), "--continuation-file",
                                  str(tmp_path / "n.txt")), smollm2_tokenizer, [])
    assert ctx == smollm2_tokenizer.encode(" ".join(SENTENCES[:20]))
    assert cont == smollm2_tokenizer.encode(" ".join(SENTENCES[20:23]))
    with pytest.raises(ValueError, match="together"):
        eval_tokens(_args("--context-file", str(tmp_path / "c.txt")), smollm2_tokenizer, [])


def test_needles_from_the_users_text(smollm2_tokenizer):
    filler = text_filler("\n".join(SENTENCES))
    assert filler[0] == " " + SENTENCES[0] and len(filler) == len(SENTENCES)
    for s in make_samples(smollm2_tokenizer, ("passkey", "kv"), 1, 300, filler=filler):
        text = smollm2_tokenizer.decode(list(s.prompt))
        assert "stood beside the old mill" in text and PASSKEY_FILLER[0].strip() not in text
        assert len(s.prompt) == 300 and s.answer_text in smollm2_tokenizer.decode(list(s.prompt[s.needle[0]:s.needle[1]]))
    kjv = text_filler(kjv_text(n_chars=4000))
    assert len(kjv) > 10


def test_text_file_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(ValueError, match="is a directory"):
        read_text_file(tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        read_text_file(bad)
    assert main(["eval", "--text-file", str(tmp_path), "--out", ""]) == 2      # before loading the model
    assert "is a directory" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--policy", "snapkv", "--budget", "1.5"]) == 2
    assert "neither a ratio" in capsys.readouterr().err


def test_truncated_gguf_is_named(tmp_path):
    from models.loading import find_smollm2_gguf, load_model
    src = find_smollm2_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(4 * 2**20))
    with pytest.raises(ValueError, match="cut.gguf .* is not a complete GGUF file"):
        load_model(str(cut), progress=False)


def test_perplexity_printed_to_three_decimals():
    from kvjax.eval.harness import COLUMNS, markdown_table
    row = {c: float("nan") for c in COLUMNS}
    row.update(policy="full", budget="1", regime="-", kept=10, kl=0.0, ppl=7.85432, notes="")
    assert "7.854" in markdown_table([row])


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--chunk-size", "0"], "--chunk-size must be positive"),
    (["--interval", "0", "--policy", "h2o", "--budget", "0.5"], "--interval must be positive"),
    (["--top-p", "0"], "top_p must be in"),
    (["--when", "decode"], "give --policy NAME"),
    (["--budget", "0.5"], "give --policy NAME"),
    (["--policy", "snapkv", "--budget", "abc"], "budget 'abc' is not a number: use a ratio like 0.25"),
    (["--dtype", "int8"], "dtype"),
])
def test_generate_checks_cheap_arguments_before_loading(argv, message, capsys, tmp_path):
    """Each bad argument is reported before the model is read: with a model file that does not
    exist, the argument's message comes out, not the missing file's."""
    assert main(["generate", "--prompt", "Hello", "--model", str(tmp_path / "absent.gguf"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent.gguf" not in err, err


def test_valid_arguments_reach_the_model_loader(capsys, tmp_path):
    """The control case of the test above: good arguments get as far as reading the model file."""
    assert main(["generate", "--prompt", "Hello", "--model", str(tmp_path / "absent.gguf")]) == 2
    assert "absent.gguf" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=2,model=1"], "the data axis must be 1"),
    (["--mesh", "model=16"], "needs 16 devices"),
    (["--mesh", "model=x"], "model=x"),
    (["--mesh", "model=1", "--policy", "locret", "--heads", "h"], "does not run Locret rows"),
])
def test_eval_mesh_checked_before_loading(argv, message, capsys, tmp_path):
    """`eval --mesh` errors (data axis, more devices than there are, Locret) come before the model
    file is read; the (1, 8) mesh run itself: tests/test_sharding.py."""
    assert main(["eval", "--model", str(tmp_path / "absent.gguf"), "--out", "", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent.gguf" not in err, err
