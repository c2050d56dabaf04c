"""The GGUF tokenizer: exact round trips, llama.cpp's `smollm` digit split, special tokens, ChatML."""
import pytest

from kvjax.eval.text import kjv_text

TEXTS = ["Hello world", "  leading spaces\n\n\ttabs and\r\nCRLF  ", "café naïve über 東京 😀 ∑x²",
         "def f(x):\n    return x ** 2  # comment", "In 1611, 31102 verses; pi=3.14159", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(smollm2_tokenizer, text):
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


def test_round_trip_long_real_text(smollm2_tokenizer):
    text = kjv_text(n_chars=60_000)
    ids = smollm2_tokenizer.encode(text)
    assert 10_000 < len(ids) < 20_000  # ~4 characters per token on English prose
    assert smollm2_tokenizer.decode(ids) == text


def test_digits_are_split_individually(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]
    assert tok.encode("hello") == [tok.token_to_id("hello")]
    assert tok.encode(" hello") == [tok.token_to_id("Ġhello")]  # GPT-2 byte-level space marker


def test_special_tokens_and_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (start, end, tok.eos_id) == (1, 2, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids.count(start) == 3 and ids.count(end) == 2 and ids[0] == start
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\nYou are")
    with_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_bad_input(smollm2_tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        smollm2_tokenizer.decode([10**6])
    with pytest.raises(TypeError):
        smollm2_tokenizer.encode(123)
    with pytest.raises(ValueError, match="at least one message"):
        smollm2_tokenizer.apply_chat_template([])


def test_ids_match_hf_transformers_fixture(smollm2_tokenizer):
    """Ids recorded by HF transformers' own GGUF tokenizer conversion (benchmarks/peers/hf_tokenizer_ids.py)."""
    import json
    import pathlib
    fixture = json.loads((pathlib.Path(__file__).parent / "fixtures" / "hf_tokenizer_ids.json").read_text())
    assert len(fixture["cases"]) >= 7
    for case in fixture["cases"]:
        assert smollm2_tokenizer.encode(case["text"]) == case["ids"], case["text"][:40]
