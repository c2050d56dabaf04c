"""Quality of the GEAR, ZipCache, MiKV and RotateKV caches on the real SmolLM2 over KJV text.

    python benchmarks/quant_quality_b.py [--tokens 2304] [--prefill 1024] [--out docs/quant_quality_b.md]

Same text and protocols as `benchmarks/quant_quality.py` (KIVI/KVQuant/QJL), against the
full-precision float32 cache on the same tokens:
  * "decode": the first `prefill` tokens are prefilled with exact attention, then the cache is
    compressed (GEAR/RotateKV: the dense prefill K/V appended to the method's cache; ZipCache/MiKV:
    the prefill ran over their full-precision buffer, then one `compress` round with the prefill's
    queries / the scorer's observations), and the remaining tokens are teacher-forced in chunks of
    `chunk` (append, then attend). ZipCache and MiKV re-compress their buffer every
    `regap` tokens (ZipCache's streaming gap 100, rounded to whole chunks), ZipCache's probes
    being drawn from the queries of the buffered tokens, MiKV's scores from the last chunk's window.
  * "fake-quant": every token goes through the method's cache from the start, in chunks of
    `fake_chunk` (ZipCache/MiKV compress after every chunk).
Perplexity and mean KL(full || method) are over the continuation (decode) or all tokens (fake-quant).
Prints a markdown table and writes it to `--out`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax import cache as kvcache  # noqa: E402
from kvjax.generate import forward_jit  # noqa: E402
from kvjax.policies.snapkv import SnapKV  # noqa: E402
from kvjax.quant import gear, kivi, mikv, rotatekv, zipcache  # noqa: E402
from kvjax.observation import Observe  # noqa: E402
from models.rope import apply_rope  # noqa: E402

MIKV_POLICY = SnapKV(window=16)


# ----------------------------------------------------------------------------- methods
# Each method: init(capacity) -> cache; from_prefill(dense, ids, p) -> cache after the prompt;
# observe: Observe for chunk forwards; after(cache, obs, q_hist, pos_hist, chunk_end) -> cache.

class Method:
    def __init__(self, name, bpt, init, convert=None, observe=Observe(), rounds=None):
        self.name, self.bpt, self.init, self.convert, self.observe, self.rounds = name, bpt, init, convert, observe, rounds


def methods(config, n, p, buffer, regap=96):
    d, L, H = config.head_dim, config.n_layers, config.n_kv_heads

    def gear_m(bits):
        cfg = gear.GEARConfig(bits=bits)
        cb = gear.compressed_bytes(p, d, bits, cfg.group, cfg.prefill_rank, cfg.outlier_ratio)
        bpt = (cb["key"] + cb["value"]) / p
        init = lambda cap, pre=p: gear.init_gear_cache(cfg, L, 1, H, d, prefill_capacity=pre, stream_capacity=cap - pre,
                                                       dtype=jnp.float16)
        conv = lambda dense, cap: kivi.append_dense(init(cap), dense)
        return Method(f"GEAR-{bits} (G64, r 4/2, s 2%, n_b 64)", bpt, init, conv)

    def rot_m(bits):
        cfg = rotatekv.RotateKVConfig(bits=bits, head_group=1, sink_tokens=4)
        init = lambda cap, pre=None: rotatekv.init_rotatekv_cache(cfg, L, 1, H, cap, d, dtype=jnp.float16)

        def conv(dense, cap):
            t = int(jnp.max(dense.lengths))
            pos = dense.positions[:, :, 0, :t]
            k_post = dense.keys[..., :t, :]
            k_pre = jax.vmap(lambda k, q: apply_rope(k, -q, config))(k_post, pos)   # undo RoPE
            return jax.jit(jax.vmap(lambda c, k, v, q: c.append(None, v, q, keys_pre_rope=k)))(
                init(cap), k_pre, dense.values[..., :t, :], pos)
        return Method(f"RotateKV-{bits} (per-token, head_group 1, 4 fp sinks)", rotatekv.bytes_per_token(d, bits, d),
                      init, conv)

    zcfg = zipcache.ZipCacheConfig()
    zip_bpt = (0.6 * (2 * d * 4 / 8) + 0.4 * (2 * d * 2 / 8) + 4 + 4         # codes, value step/min, position
               + 2 * (3 * d * 2 + 4) / zcfg.streaming_gap)                   # per-round stats, amortised
    zip_m = Method("ZipCache (60% 4-bit / 40% 2-bit)", zip_bpt,
                   lambda cap, pre=None: zipcache.init_zipcache(zcfg, L, 1, H, d, capacity=cap, buffer=buffer,
                                                                dtype=jnp.float16),
                   observe=Observe(qkv=True), rounds="zip")

    def mikv_m(lo_bits):
        cfg = mikv.MiKVConfig(keep_ratio=0.2, hi_bits=16, lo_bits=lo_bits)
        bpt = 0.2 * (2 * d * 2 + 4) + 0.8 * (2 * d * lo_bits / 8 + 2 * 4 + 4)
        return Method(f"MiKV (SnapKV w16: 20% fp16, 80% INT{lo_bits}, balancer)", bpt,
                      lambda cap, pre=None: mikv.init_mikv_cache(cfg, L, 1, H, d, capacity=cap, buffer=buffer,
                                                                 dtype=jnp.float16),
                      observe=mikv.observe_for(MIKV_POLICY), rounds="mikv")

    def in_generate(name, label, bpt_name, **kw):
        """A registry cache that compresses itself (kvjax.quant.streaming): decode protocol = the dense
        prompt appended, then `resize` (what generate calls after prefill) runs the first round; the
        fake-quant protocol rounds every `fake_chunk` tokens."""
        from kvjax.quant import bytes_per_token_head, make_cache_init

        def init(cap, pre=None):
            if pre is None:   # decode protocol: rounds every `regap` tokens after the prompt
                return make_cache_init(name, interval=regap, dtype=jnp.float16, **kw)(config, 1, cap)
            c = make_cache_init(name, interval=pre, dtype=jnp.float16, **kw)(config, 1, cap)
            return c.resize(cap)  # empty: only shrinks the buffer to `pre` (= fake_chunk) slots
        return Method(label, bytes_per_token_head(name, config, interval=regap, **kw), init,
                      lambda dense, cap: kivi.append_dense(init(cap), dense).resize(cap))

    kcfg = kivi.KIVIConfig(2, 2, 32, 128)
    return [
        Method("full (fp32 cache)", 2 * d * 4,
               lambda cap, pre=None: kvcache.init_cache(L, 1, H, cap, d), lambda dense, cap: dense),
        Method("KIVI-2 (G32 R128, part A, reference)", kivi.bytes_per_token(d, 2, 2, 32),
               lambda cap, pre=None: kivi.init_kivi_cache(config, 1, cap, bits=2, group=32, residual=128),
               lambda dense, cap: kivi.from_dense(dense, kcfg, cap)),
        gear_m(4), gear_m(2), zip_m, mikv_m(2), mikv_m(4), rot_m(2), rot_m(4),
        # the query-free variants (scorer="keys"): these rows feed dense K/V, no queries are observed
        in_generate("zipcache", "ZipCache in generate (registry `zipcache`: key-probe saliency, rounds inside "
                    "the cache)", "zipcache", scorer="keys"),
        in_generate("mikv", "MiKV in generate (registry `mikv`: KNorm 20% fp16, 80% INT2, no balancer)", "mikv",
                    scorer="keys"),
        in_generate("mikv4", "MiKV in generate (registry `mikv4`: KNorm 20% fp16, 80% INT4, no balancer)", "mikv4",
                    scorer="keys"),
    ]


def compress_round(method, cache, obs, q_hist, pos_hist, config):
    if method.rounds == "zip":
        return _zip_compress(cache, jnp.concatenate(q_hist, axis=-2), jnp.concatenate(pos_hist, axis=-1))
    if method.rounds == "mikv":
        return _mikv_compress(cache, obs, MIKV_POLICY, config)
    return cache


_zip_compress = jax.jit(zipcache.compress)
_mikv_compress = jax.jit(mikv.compress, static_argnums=(2, 3))
_queries = jax.jit(zipcache.queries_from_obs, static_argnums=(2,))


def score(method, params, config, cache, ids, lo, hi, chunk, ref, targets, regap):
    """Teacher-force ids[lo:hi] in chunks; returns (nll sum, kl sum, count, cache)."""
    nll_sum, kl_sum, cnt = 0.0, 0.0, 0
    q_hist, pos_hist, since = [], [], 0
    for s in range(lo, hi, chunk):
        e = min(s + chunk, hi)
        pos = jnp.arange(s, e, dtype=jnp.int32)[None]
        logits, cache, obs = forward_jit(params, jnp.asarray(ids[None, s:e]), pos, cache, config, method.observe,
                                         all_logits=True)
        lp = jax.nn.log_softmax(logits[0], -1)
        m = min(e, len(ids) - 1) - s                                      # positions with a next token
        nll_sum += float(-jnp.sum(jnp.take_along_axis(lp[:m], jnp.asarray(targets[s:s + m])[:, None], -1)))
        kl_sum += float(jnp.sum(jnp.exp(ref[s:s + m]) * (ref[s:s + m] - lp[:m])))
        cnt += m
        if method.rounds:
            if method.rounds == "zip":
                q_hist.append(_queries(obs, pos, config))
                pos_hist.append(pos)
            since += e - s
            if since >= regap or e == hi:
                cache = compress_round(method, cache, obs, q_hist, pos_hist, config)
                if method.rounds:
                    zipcache.check_buffer(cache)
                q_hist, pos_hist, since = [], [], 0
    return nll_sum, kl_sum, cnt, cache


def run(args) -> str:
    from kvjax.eval.text import kjv_text
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    jax.config.update("jax_default_matmul_precision", "highest")
    config, params = load_model("smollm2", progress=False)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok = load_tokenizer("smollm2")
    n, p, c, fc = args.tokens, args.prefill, args.chunk, args.fake_chunk
    ids = np.asarray(tok.encode(kjv_text(n_chars=8 * n))[:n], np.int32)
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of text")
    regap = max(c, (100 // c) * c)                                          # ZipCache streaming gap, whole chunks
    buffer = max(p, regap + c, fc)

    dense = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
    logits, _, _ = forward_jit(params, jnp.asarray(ids[None]), jnp.arange(n, dtype=jnp.int32)[None], dense, config,
                               all_logits=True)
    ref = jax.nn.log_softmax(logits[0], axis=-1)
    del logits
    targets = np.concatenate([ids[1:], [0]]).astype(np.int32)
    ref_nll = -np.asarray(jnp.take_along_axis(ref, jnp.asarray(targets)[:, None], axis=-1))[:, 0]
    base_dec = float(np.exp(ref_nll[p:n - 1].mean()))
    base_fake = float(np.exp(ref_nll[:n - 1].mean()))
    dp = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
    _, dp, _ = forward_jit(params, jnp.asarray(ids[None, :p]), jnp.arange(p, dtype=jnp.int32)[None], dp, config)

    rows = []
    d, L, H = config.head_dim, config.n_layers, config.n_kv_heads
    all_methods = methods(config, n, p, buffer, regap)
    rows_path = pathlib.Path(args.rows) if args.rows else None
    for method in all_methods:
        if args.table_only or (args.methods and not any(m.lower() in method.name.lower() for m in args.methods)):
            continue
        t0 = time.time()
        # decode protocol
        if method.convert is not None:
            cache = method.convert(dp, n)
        else:
            cache = method.init(n)
            pos = jnp.arange(p, dtype=jnp.int32)[None]
            _, cache, obs = forward_jit(params, jnp.asarray(ids[None, :p]), pos, cache, config, method.observe)
            q_hist = [_queries(obs, pos, config)] if method.rounds == "zip" else []
            cache = compress_round(method, cache, obs, q_hist, [pos], config)
        nll, kl, cnt, cache = score(method, params, config, cache, ids, p, n, c, ref, targets, regap)
        ppl_d, kl_d = math.exp(nll / cnt), kl / cnt
        mem = cache.memory_bytes()
        # fake-quant protocol
        cache = method.init(n, fc) if method.convert is not None else method.init(n)
        nll, kl, cnt_f, _ = score(method, params, config, cache, ids, 0, n, fc, ref, targets, fc)
        ppl_f, kl_f = math.exp(nll / cnt_f), kl / cnt_f
        rows.append((method.name, method.bpt, method.bpt * 8 / (2 * d), ppl_d, 100 * (ppl_d / base_dec - 1), kl_d,
                     ppl_f, 100 * (ppl_f / base_fake - 1), kl_f, mem / 2 ** 20, mem / (L * H * n)))
        if rows_path is not None:
            with open(rows_path, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        print(f"{method.name}: decode ppl {ppl_d:.4f} ({rows[-1][4]:+.2f}%) KL {kl_d:.4f} | fake-quant ppl "
              f"{ppl_f:.4f} ({rows[-1][7]:+.2f}%) KL {kl_f:.4f} | {time.time() - t0:.0f} s", flush=True)

    if rows_path is not None and rows_path.exists():   # rows of every run that wrote to this file
        saved = {}
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            saved[r[0]] = tuple(r)
        rows = [saved[m.name] for m in all_methods if m.name in saved]
    hdr = ("| method | B / token / kv-head | bits / coord | decode ppl | Δppl | mean KL | fake-quant ppl | Δppl | "
           "mean KL | cache MiB at end | allocated B / token / kv-head |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f} | {r[3]:.4f} | {r[4]:+.2f}% | {r[5]:.4f} | {r[6]:.4f} | "
                   f"{r[7]:+.2f}% | {r[8]:.4f} | {r[9]:.2f} | {r[10]:.0f} |\n" for r in rows)
    table = hdr + body
    doc = (f"# GEAR, ZipCache, MiKV, RotateKV quality on SmolLM2-135M (KJV text)\n\n"
           f"Generated by `benchmarks/quant_quality_b.py` on {datetime.date.today()} ({jax.default_backend()}, "
           f"float32 model, matmul precision highest). Same text and protocols as `docs/quant_quality.md`.\n\n"
           f"Text: the first {n} tokens of the King James Bible (Genesis 1:1 on). Full-cache perplexity: "
           f"{base_dec:.4f} on the continuation (tokens {p + 1}..{n - 1}), {base_fake:.4f} on all tokens.\n\n"
           f"* **decode**: {p} tokens prefilled with exact attention, then compressed (GEAR / RotateKV / KIVI: "
           f"the dense prompt K/V appended to the cache; ZipCache / MiKV: one compression round of their fp "
           f"buffer), then tokens {p}..{n - 1} teacher-forced in chunks of {c}; ZipCache and MiKV compress "
           f"their buffer every {regap} tokens (ZipCache probes: 5 % last + 5 % random of the buffered tokens' "
           f"queries; MiKV: SnapKV(window 16) scores from the last chunk).\n"
           f"* **fake-quant**: all {n} tokens through the cache from the start, in chunks of {fc} "
           f"(ZipCache / MiKV compress after every chunk; GEAR's first chunk is its rank-4 prefill region).\n"
           f"* KL = mean KL(full || method) of the next-token distributions over the same positions.\n"
           f"* B / token / kv-head: the compressed representation, K + V (codes, float16 scales/mins, outliers "
           f"with int32 indices, low-rank factors amortised over the {p}-token prompt for GEAR, token positions "
           f"for the mixed-precision pools of ZipCache / MiKV); fp buffers and residual windows excluded; "
           f"head_dim = {d}, an fp16 dense cache is {2 * d * 2} B. bits / coord = 8 * B / (2 * head_dim).\n"
           f"* cache MiB / allocated B: `memory_bytes()` of the cache after all {n} tokens (decode protocol), "
           f"every layer, buffers (float16 here; float32 for the full and KIVI rows) and capacity slack "
           f"included.\n"
           f"* RotateKV on SmolLM2 (3 kv-heads) uses head_group = 1 (64-point FWHT per head): the paper's 4-head "
           f"group needs kv_heads divisible by 4. Its massive-activation sinks are approximated by the first "
           f"4 tokens kept in fp.\n\n"
           + table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2304)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--fake-chunk", type=int, default=256)
    ap.add_argument("--methods", nargs="*", default=None, help="substrings of method names to run")
    ap.add_argument("--out", default="docs/quant_quality_b.md")
    ap.add_argument("--rows", default=None, help="jsonl file: append each method's row, build the table from all")
    ap.add_argument("--table-only", action="store_true", help="only build the table from --rows")
    args = ap.parse_args(argv)
    print(run(args))


if __name__ == "__main__":
    main()
