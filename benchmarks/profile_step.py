"""Where a decode step's time goes (GPU): a profiler trace of `kvjax.generate`'s decode loop,
summed per kernel family, beside the weights' own matvec time and the copy ceiling of the same run.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/profile_step.py --shapes 1x32768,8x128 \
        --methods dense 2>&1 | tee $OUT/profile.log
    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/profile_step.py --tiny     # CPU smoke test

Per (shape, method): a warm-up `generate` call compiles, then two timed calls with N and 2N new
tokens run under `jax.profiler.trace`; the decode-step time is their decode_s difference / N (so
prefill, the first token and the loop's entry cost cancel). The trace's device kernel events of the
second call's decode window are grouped by family (matmul, attention kernel, cache update,
elementwise fusion, copy, other) and divided by its N' = 2N - 1 steps: "kernel ms/step" is the time
the GPU spent executing, "idle ms/step" = step - kernel (launch gaps, host round trips, syncs).

Ceilings measured in the same run: the XLA copy bandwidth (`benchmarks/e2e.py`'s jax_ceilings),
and the weights' matvec: every weight matrix of the model (the lm_head included) multiplied by a
[batch, in] activation in one jitted call — the floor for the matmuls of one decode step, and how
close XLA's small-batch GEMMs get to the copy rate.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (the engine adapter, ceilings and model shapes of the e2e benchmark)

FAMILIES = (  # (family, substrings of a kernel name), first match wins
    ("attention", ("kvjax_", "flash", "decode", "attention")),
    ("matmul", ("gemm", "matmul", "dot", "cublas", "cutlass", "sm90_xmma", "nvjet")),
    ("cache_update", ("dynamic_update_slice", "dynamic-update-slice", "scatter")),
    ("copy", ("copy", "memcpy", "memset", "transpose")),
    ("fusion", ("fusion", "loop_", "input_", "reduce", "convert", "multiply", "add")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def weights_matvec_s(params, config, batch: int, reps: int = 10) -> float:
    """Seconds for one pass of every weight matrix (layers + lm_head) against a [batch, in]
    activation, in one jitted call (outputs reduced so nothing is dead code)."""
    mats = [w for layer in params["layers"] for w in layer.values() if w.ndim == 2]
    mats.append(params["embed"].T if config.tie_embeddings else params["lm_head"])

    @jax.jit
    def one_pass(xs, mats):   # weights as arguments: a closure would embed 15 GB of constants
        return sum(jnp.sum((x @ w).astype(jnp.float32)) for x, w in zip(xs, mats))

    key = jax.random.PRNGKey(0)
    xs = [jax.random.normal(key, (batch, w.shape[0]), jnp.bfloat16) for w in mats]
    one_pass(xs, mats).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        one_pass(xs, mats).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def device_events(trace_dir: str):
    """(name, start_us, dur_us) of every complete event on a device (GPU/TPU) track of the newest
    perfetto trace under trace_dir."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no trace under {trace_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in names.items() if "/device:" in n and "cpu" not in n.lower()}
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
            if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e]


def profile_row(params, config, b: int, t: int, method: str, new_tokens: int, chunk: int,
                trace_dir: str) -> dict:
    rng = np.random.default_rng(1234 + b * 7 + t)
    prompts = [r.tolist() for r in rng.integers(0, config.vocab_size, (b, t), dtype=np.int64)]
    e2e.run_engine(params, config, prompts, method, new_tokens, chunk)          # compiles N
    e2e.run_engine(params, config, prompts, method, 2 * new_tokens, chunk)      # compiles 2N
    short = e2e.run_engine(params, config, prompts, method, new_tokens, chunk)
    with jax.profiler.trace(trace_dir):
        t_call = time.perf_counter()
        long = e2e.run_engine(params, config, prompts, method, 2 * new_tokens, chunk)
        t_call = time.perf_counter() - t_call
    step_ms = 1e3 * (long["decode_s"] - short["decode_s"]) / new_tokens
    row = {"batch": b, "context": t, "method": method, "step_ms": step_ms,
           "step_ms_single": 1e3 * long["decode_s"] / long["steps"], "call_s": t_call}
    try:
        ev = device_events(trace_dir)
    except (FileNotFoundError, KeyError, ValueError) as e:
        row["trace_error"] = f"{type(e).__name__}: {e}"
        return row
    if not ev:
        row["trace_error"] = "no device kernel events in the trace (CPU backend?)"
        return row
    # the decode window: the last decode_s of device activity (prefill runs first)
    end = max(s + d for _, s, d in ev)
    window = [(n, s, d) for n, s, d in ev if s >= end - 1e6 * long["decode_s"]]
    steps = long["steps"]
    per_fam = collections.Counter()
    per_name = collections.Counter()
    count = collections.Counter()
    for n, _, d in window:
        per_fam[family(n)] += d
        per_name[n] += d
        count[family(n)] += 1
    row["kernel_ms_step"] = sum(per_fam.values()) / 1e3 / steps
    row["kernels_per_step"] = len(window) / steps
    row["family_ms_step"] = {k: v / 1e3 / steps for k, v in per_fam.most_common()}
    row["family_count_step"] = {k: v / steps for k, v in count.most_common()}
    row["top_kernels_ms_step"] = [(n[:80], v / 1e3 / steps) for n, v in per_name.most_common(12)]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x32768,8x128")
    ap.add_argument("--methods", default="dense")
    ap.add_argument("--new-tokens", type=int, default=16, help="N (the long call runs 2N)")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "profile.json"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers, d_model 128")
    a = ap.parse_args()
    if a.tiny:
        config, a.shapes, a.new_tokens, a.chunk, copy_bytes = e2e.tiny_config(), "2x64", 4, 32, 2 ** 24
    else:
        config, copy_bytes = e2e.get_config("llama3-8b"), 2 ** 32
    from models.llama import init_params
    params = jax.jit(init_params, static_argnames=("config", "dtype"))(
        config=config, key=jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    counts = e2e.model_counts(params, config)
    ceil = e2e.jax_ceilings(copy_bytes, 256 if a.tiny else 8192)
    bw = max(v for k, v in ceil.items() if k.endswith("_Bps"))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; copy {bw / 1e12:.3f} TB/s (XLA); "
          f"weights {counts['weight_bytes'] / 1e9:.2f} GB -> {1e3 * counts['weight_bytes'] / bw:.2f} ms at copy",
          flush=True)
    rows = []
    for b, t in e2e.parse_shapes(a.shapes):
        mv = weights_matvec_s(params, config, b)
        print(f"{b}x{t}: weights matvec {1e3 * mv:.2f} ms = {counts['weight_bytes'] / mv / 1e12:.3f} TB/s "
              f"({counts['weight_bytes'] / mv / bw:.2f} of copy)", flush=True)
        for m in a.methods.split(","):
            with tempfile.TemporaryDirectory() as d:
                row = profile_row(params, config, b, t, m, a.new_tokens, a.chunk, d)
            row.update(weights_matvec_ms=1e3 * mv, copy_Bps=bw, weight_bytes=counts["weight_bytes"])
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
            with open(a.out, "w") as f:
                json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": rows}, f,
                          indent=1)
    print(f"json: {a.out}")


if __name__ == "__main__":
    main()
