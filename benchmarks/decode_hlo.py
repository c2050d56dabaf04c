"""What the compiled decode loop does with the cache (diagnosis, any backend): compiles
`kvjax.generate.decode_loop` for a model shape from abstract arguments (no weights or cache are
allocated), prints XLA's memory analysis and every instruction of the while loop's body whose
result is at least one layer's K or V buffer in size (a cache-sized copy, scatter or fusion
per step is what keeps a decode step above the memory roofline), and writes the optimized HLO.

    PYTHONPATH=. python3 benchmarks/decode_hlo.py --shapes 1x32768,8x32768 --methods dense,kivi4
    PYTHONPATH=. python benchmarks/decode_hlo.py --tiny              # CPU smoke test
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (method names and model shapes of the e2e benchmark)

from kvjax.generate import decode_loop, init_engine_cache  # noqa: E402
from kvjax.hlo import while_body_ops  # noqa: E402
from kvjax.sampling import Sampling  # noqa: E402
from models.config import get_config  # noqa: E402
from models.llama import init_params  # noqa: E402

SHAPE = re.compile(r"= (\w+)\[([\d,]*)\]")
ELEMENT_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def result_bytes(line: str) -> int:
    m = SHAPE.search(line)
    if not m or m.group(1) not in ELEMENT_BYTES:
        return 0
    n = 1
    for d in filter(None, m.group(2).split(",")):
        n *= int(d)
    return n * ELEMENT_BYTES[m.group(1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x32768,8x32768")
    ap.add_argument("--methods", default="dense")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args()
    config = e2e.tiny_config() if a.tiny else get_config("llama3-8b")
    dtype = jnp.bfloat16
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype=dtype))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {config.name}", flush=True)
    for shape in e2e.parse_shapes(a.shapes):
        b, s = shape
        for method in a.methods.split(","):
            init = e2e.method_kwargs(method).get("cache_init")
            cache = jax.eval_shape(lambda: init_engine_cache(config, b, s, dtype, cache_init=init))
            # one layer's K in bf16 (dense), or its 4-bit codes (quantized caches)
            layer_kv = b * config.n_kv_heads * s * config.head_dim * 2 // (1 if init is None else 4)
            args = (params, cache, jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
                    jax.random.PRNGKey(0))
            compiled = decode_loop.lower(*args, config=config, sampling=Sampling(), max_new_tokens=8, eos_ids=(),
                                         compression=None, attention=a.attention).compile()
            hlo = compiled.as_text()
            mem = compiled.memory_analysis()
            cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
            big = [l for l in while_body_ops(hlo) if result_bytes(l) >= layer_kv and " parameter(" not in l
                   and " get-tuple-element(" not in l and " bitcast(" not in l and " tuple(" not in l]
            print(f"\n{b}x{s} {method}: cache {cache_bytes / 1e9:.2f} GB, temp {mem.temp_size_in_bytes / 1e9:.3f} GB, "
                  f"alias {mem.alias_size_in_bytes / 1e9:.2f} GB; while-body results >= one layer's K "
                  f"({layer_kv / 1e6:.1f} MB): {len(big)}", flush=True)
            for l in big[:60]:
                print("   ", l.strip()[:260])
            path = os.path.join(a.out, f"decode_hlo_{b}x{s}_{method}.txt.gz")
            with gzip.open(path, "wt") as f:
                f.write(hlo)
            print("   hlo:", path)


if __name__ == "__main__":
    main()
