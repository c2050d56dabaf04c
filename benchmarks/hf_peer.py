"""The peer a user would pick: HF transformers `LlamaForCausalLM` (PyTorch, sdpa attention) with a
Llama-3-8B shape, random init in bf16 on the GPU; chunked prefill then greedy decode, per
(batch, context) and cache type. Compare with benchmarks/e2e.py (same shapes, chunk, token count).

    PYTHONUNBUFFERED=1 python3 benchmarks/hf_peer.py 2>&1 | tee $OUT/hf_peer.log     # 8x16384, 8x32768
    PYTHONUNBUFFERED=1 python3 benchmarks/hf_peer.py --shapes 1x65536,32x16384 --caches static
    PYTHONUNBUFFERED=1 python3 benchmarks/hf_peer.py --shapes 8x16384 --caches static,static_compiled
    python benchmarks/hf_peer.py --tiny            # CPU smoke test (2 layers, hidden 256; ~30 s)

Cache types (`--caches`): `dynamic` = the model's default DynamicCache (created by the model on the
first chunk; grows by concatenation), `static` = StaticCache with max_cache_len = context +
new tokens, `static_compiled` (not in the default set) = StaticCache with the decode steps run
through `torch.compile(mode="reduce-overhead")` (CUDA graphs): its first 3 decode steps compile
and are not timed, and their compile time is reported.

Per row: prefill in chunks of `--chunk` tokens (`logits_to_keep=1`, as HF's generate does), then
new_tokens - 1 greedy decode steps (`model(input_ids=next, past_key_values=cache,
cache_position=...)`, argmax; the first token comes from prefill, as in kvjax's generate). Timed
with CUDA events; one warm-up row at batch 1 x 2 chunks first, per cache type. Peak memory is
`torch.cuda.max_memory_allocated` (reset per row); cache GB = the K/V tensors after decode.
Rows fail independently (OOM -> one line; the cache is freed and `torch.cuda.empty_cache()`).
JSON of all rows: `--out` (default `$OUT/hf_peer.json` when OUT is set), rewritten after every
row. The model has Llama-3.1's llama3 RoPE scaling where the installed transformers takes it
(speed is the same either way).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import sys
import time

import torch

T_START = time.perf_counter()
GB = 1e9


def elapsed() -> float:
    return time.perf_counter() - T_START


def build_config(tiny: bool):
    from transformers import LlamaConfig
    kw = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128009])
    if tiny:
        kw.update(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    attempts = [dict(rope_parameters={"rope_theta": 500000.0, **scaling}),   # transformers >= 5
                dict(rope_theta=500000.0, rope_scaling=scaling),              # 4.x
                dict(rope_theta=500000.0)]
    err = None
    for extra in attempts:
        try:
            cfg = LlamaConfig(**kw, **extra)
            return cfg, extra
        except (TypeError, ValueError, KeyError) as e:  # this version does not take these arguments
            err = e
    raise RuntimeError(f"LlamaConfig rejected every argument set: {err}")


def build_model(cfg, device):
    """Random init directly on `device` in bf16 (from_config under a device context)."""
    from transformers import AutoModelForCausalLM
    err = None
    with torch.device(device):
        for dkw in ("dtype", "torch_dtype"):  # transformers >= 4.56 / older
            try:
                model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", **{dkw: torch.bfloat16})
                break
            except TypeError as e:
                err = e
        else:
            raise RuntimeError(f"from_config failed: {err}")
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    return model


def make_static_cache(model, batch: int, max_len: int, device):
    """StaticCache across transformers versions (constructor arguments changed)."""
    from transformers import StaticCache
    attempts = [
        dict(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=torch.bfloat16),
        dict(config=model.config, batch_size=batch, max_cache_len=max_len, device=device, dtype=torch.bfloat16),
        dict(config=model.config, max_cache_len=max_len),
    ]
    err = None
    for kw in attempts:
        try:
            return StaticCache(**kw)
        except TypeError as e:
            err = e
    raise RuntimeError(f"StaticCache rejected every argument set: {err}")


def cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a cache holds (transformers 5: cache.layers[i].keys/values; 4.x:
    key_cache / value_cache lists)."""
    ts = []
    for layer in getattr(cache, "layers", None) or []:
        ts += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    for name in ("key_cache", "value_cache"):
        try:
            ts += list(getattr(cache, name, None) or [])
        except Exception:  # noqa: BLE001 (a deprecated property may raise)
            pass
    seen, total = set(), 0
    for t in ts:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.e0, self.e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.e1.record()
            self.e1.synchronize()
            self.s = self.e0.elapsed_time(self.e1) / 1e3
        else:
            self.s = time.perf_counter() - self.t0
        return False


def run_row(model, ids, kind, new_tokens, chunk, logits_kw, device) -> dict:
    """Prefill `ids [B, T]` in chunks into the cache `kind`, then new_tokens - 1 greedy steps."""
    b, t = ids.shape
    cache = make_static_cache(model, b, t + new_tokens, device) if kind.startswith("static") else None
    extra = {logits_kw: 1} if logits_kw else {}
    out = {}
    with torch.inference_mode():
        with Timer(device) as tp:
            for s in range(0, t, chunk):
                e = min(s + chunk, t)
                o = model(input_ids=ids[:, s:e], past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(s, e, device=device), **extra)
                cache = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1)
            del o
        out["prefill_s"] = tp.s
        step_fn = model
        skip = 0
        if kind == "static_compiled":
            step_fn = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default")
            skip = 3  # compile + graph capture happen in these steps; not timed
        mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)

        def step(i, nxt):
            if kind == "static_compiled" and mark is not None:
                mark()
            o = step_fn(input_ids=nxt[:, None], past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([t + i], device=device))
            return o.logits[:, -1].argmax(-1).clone()

        steps = new_tokens - 1
        with Timer(device) as tw:
            for i in range(min(skip, steps)):
                nxt = step(i, nxt)
        out["compile_s"] = tw.s if skip else 0.0
        with Timer(device) as td:
            for i in range(min(skip, steps), steps):
                nxt = step(i, nxt)
        out["decode_steps_timed"] = steps - min(skip, steps)
        out["decode_s"] = td.s
        out["cache_bytes"] = cache_bytes(cache)
        out["last_token_row0"] = int(nxt[0])
    del cache
    return out


def fmt(r) -> str:
    if r.get("status") != "ok":
        return f"{r['batch']}x{r['context']} {r['cache']}: {r['status']}"
    return (f"{r['batch']}x{r['context']} {r['cache']}: prefill {r['prefill_s']:.2f} s {r['prefill_tok_s']:.0f} tok/s; "
            f"decode {r['decode_ms_step']:.2f} ms/step ({r['decode_tok_s']:.0f} tok/s); "
            f"cache {r['cache_bytes'] / GB:.2f} GB; "
            f"peak {r['peak_bytes'] / GB:.1f} GB" + (f"; compile {r['compile_s']:.0f} s" if r.get("compile_s") else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None, help="comma list of BATCHxCONTEXT (default 8x16384,8x32768; "
                    "--tiny: 2x256)")
    ap.add_argument("--caches", default="dynamic,static",
                    help="comma list of dynamic,static,static_compiled (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default 128; --tiny: 8)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default 4096; --tiny: 64)")
    ap.add_argument("--out", default=os.path.join(os.environ["OUT"], "hf_peer.json") if os.environ.get("OUT")
                    else None,
                    help="JSON of all rows (default $OUT/hf_peer.json when OUT is set)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the batch-1 warm-up rows")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 2 layers, hidden 256 (CPU when no GPU)")
    ap.add_argument("--seed", type=int, default=0, help="init and prompt seed (default: %(default)s)")
    a = ap.parse_args()
    a.shapes = a.shapes or ("2x256" if a.tiny else "8x16384,8x32768")
    a.new_tokens = a.new_tokens or (8 if a.tiny else 128)
    a.chunk = a.chunk or (64 if a.tiny else 4096)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in a.shapes.split(",") if s]
    kinds = [k for k in a.caches.split(",") if k]
    for k in kinds:
        if k not in ("dynamic", "static", "static_compiled"):
            raise SystemExit(f"unknown cache type {k!r}")
    import transformers
    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        raise SystemExit("no CUDA device (use --tiny for a CPU smoke test)")
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(a.seed)
    cfg, rope_kw = build_config(a.tiny)
    model = build_model(cfg, device)
    if cuda:
        torch.cuda.synchronize()
    n_params = sum(p.numel() for p in model.parameters())
    fwd = inspect.signature(model.forward).parameters
    logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in fwd), None)
    attn = getattr(model.config, "_attn_implementation", "?")
    p0 = next(model.parameters())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; {n_params / 1e9:.3f} B params {p0.dtype} "
          f"on {p0.device}, "
          f"attention {attn}, rope {list(rope_kw)}, logits kw {logits_kw}; built in {elapsed():.0f} s", flush=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "params": n_params, "attention": attn,
            "new_tokens": a.new_tokens, "chunk": a.chunk, "argv": sys.argv[1:]}
    gen = torch.Generator().manual_seed(a.seed)

    if not a.no_warmup:  # kernels, cuBLAS handles, allocator: batch 1 x 2 chunks, 4 new tokens
        ids = torch.randint(0, cfg.vocab_size, (1, 2 * a.chunk), generator=gen).to(device)
        for kind in kinds:
            if kind == "static_compiled":
                continue  # compiles for the real shape inside its row
            try:
                run_row(model, ids, kind, 4, a.chunk, logits_kw, device)
            except Exception as e:  # noqa: BLE001
                print(f"warm-up {kind} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
        print(f"warm-up done ({elapsed():.0f} s)", flush=True)

    rows = []

    def dump():
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for b, t in shapes:
        ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).to(device)
        for kind in kinds:
            row = {"batch": b, "context": t, "cache": kind}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                r = run_row(model, ids, kind, a.new_tokens, a.chunk, logits_kw, device)
                row.update(r)
                row["prefill_tok_s"] = b * t / r["prefill_s"]
                n = max(r["decode_steps_timed"], 1)
                row["decode_ms_step"] = 1e3 * r["decode_s"] / n
                row["decode_tok_s"] = b * n / r["decode_s"]
                row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else 0
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 (OOM: one line, free, go on)
                row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else 0
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            row["row_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"[{elapsed():5.0f} s] {fmt(row)}", flush=True)
            dump()
        del ids

    if a.out:
        print(f"\nJSON: {a.out}")
    print(f"\nHF transformers {transformers.__version__} LlamaForCausalLM ({attn}), bf16, chunk {a.chunk}, "
          f"{a.new_tokens} new tokens\n")
    print("| batch x ctx | cache | prefill s | prefill tok/s | decode ms/step | decode tok/s | cache GB | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = f"{r['batch']}x{r['context']}"
        if r["status"] != "ok":
            print(f"| {shape} | {r['cache']} | {r['status'][:80]} | | | | | {r['peak_bytes'] / GB:.1f} |")
        else:
            print(f"| {shape} | {r['cache']} | {r['prefill_s']:.2f} | {r['prefill_tok_s']:.0f} | "
                  f"{r['decode_ms_step']:.2f} | {r['decode_tok_s']:.0f} | {r['cache_bytes'] / GB:.2f} | "
                  f"{r['peak_bytes'] / GB:.1f} |")
    print(f"\ntotal {elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
