"""Quality of the quantized KV caches (KIVI, KVQuant, QJL) on the real SmolLM2 over KJV text.

    python benchmarks/quant_quality.py [--tokens 2304] [--prefill 1024] [--out docs/quant_quality.md]

Two protocols, both against the full-precision (float32) cache on the same tokens:
  * "decode": the first `prefill` tokens are prefilled in full precision (attention over the prompt
    is exact, as in KIVI's prefill), the cache is then quantized with the method's `from_dense`
    (KIVI rule: T - T mod R keys and T - R values quantized), and the remaining tokens are
    teacher-forced in chunks of `chunk` tokens (append, then attend) through the quantized cache.
    Perplexity and mean KL(full || quantized) are over the continuation tokens.
  * "fake-quant": every token goes through the quantized cache from the start (prefill in chunks of
    `fake_chunk` tokens), so each query sees all earlier tokens as the cache holds them (KVQuant's
    perplexity protocol). Perplexity and KL over all tokens.
KVQuant is calibrated on a different part of the KJV (verses from 20000 on) than the evaluation text
(from Genesis 1:1). Prints a markdown table and writes it to `--out`.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax import cache as kvcache  # noqa: E402
from kvjax.generate import forward_jit  # noqa: E402
from kvjax.quant import kivi, kvquant, kvtuner, qjl, sink  # noqa: E402
from models.llama import forward  # noqa: E402


def method_table(config, calib, tuner=None):
    d = config.head_dim
    g = 32
    kivi_b = lambda kb, vb: kivi.bytes_per_token(d, kb, vb, g)
    n_side = kvquant.KVQuantConfig().n_side(d)
    qjl_b = lambda c: qjl.key_bytes_per_token(d, c) + d * c.value_bits / 8 + 4 * d / c.value_group
    q_small = qjl.QJLConfig(sketch_dim=128, outlier_sketch_dim=64)
    q_def = qjl.QJLConfig()
    kivi_sink = lambda bits, n_sink, c: sink.with_sink(
        kivi.init_kivi_cache(config, 1, c, bits=bits, group=32, residual=128), n_sink)
    table = {
        # name: (bytes per token per kv-head of the quantized part, from_dense(dense, capacity), init(capacity))
        "full (fp32 cache)": (2 * d * 4, lambda dn, c: dn,
                              lambda c: kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, c, config.head_dim)),
        "KIVI-4 (G32 R128)": (kivi_b(4, 4), lambda dn, c: kivi.from_dense(dn, kivi.KIVIConfig(4, 4, 32, 128), c),
                              lambda c: kivi.init_kivi_cache(config, 1, c, bits=4, group=32, residual=128)),
        "KIVI-2 (G32 R128)": (kivi_b(2, 2), lambda dn, c: kivi.from_dense(dn, kivi.KIVIConfig(2, 2, 32, 128), c),
                              lambda c: kivi.init_kivi_cache(config, 1, c, bits=2, group=32, residual=128)),
        "KIVI-2 (G32 R32)": (kivi_b(2, 2), lambda dn, c: kivi.from_dense(dn, kivi.KIVIConfig(2, 2, 32, 32), c),
                             lambda c: kivi.init_kivi_cache(config, 1, c, bits=2, group=32, residual=32)),
        # opt-in extension (kvjax.quant.sink): the first token(s) in fp, left out of the quantized groups
        "KIVI-2 (G32 R128) + 1 fp sink token": (kivi_b(2, 2), lambda dn, c: kivi.append_dense(kivi_sink(2, 1, c), dn),
                                                lambda c: kivi_sink(2, 1, c)),
        "KIVI-2 (G32 R128) + 4 fp sink tokens": (kivi_b(2, 2), lambda dn, c: kivi.append_dense(kivi_sink(2, 4, c), dn),
                                                 lambda c: kivi_sink(2, 4, c)),
        "KIVI-4 (G32 R128) + 1 fp sink token": (kivi_b(4, 4), lambda dn, c: kivi.append_dense(kivi_sink(4, 1, c), dn),
                                                lambda c: kivi_sink(4, 1, c)),
        "KVQuant-4 (nuq4-1%, sink 5)": (kvquant.bytes_per_token(d, 4, n_side),
                                        lambda dn, c: kvquant.from_dense(dn, calib, config, 4, c),
                                        lambda c: kvquant.init_kvquant_cache(config, 1, c, calib, bits=4)),
        "KVQuant-3 (nuq3-1%, sink 5)": (kvquant.bytes_per_token(d, 3, n_side),
                                        lambda dn, c: kvquant.from_dense(dn, calib, config, 3, c),
                                        lambda c: kvquant.init_kvquant_cache(config, 1, c, calib, bits=3)),
        "QJL (m=256, m_out=256, V KIVI-2)": (qjl_b(q_def), lambda dn, c: qjl.from_dense(dn, q_def, c),
                                             lambda c: qjl.init_qjl_cache(config, 1, c, q_def)),
        "QJL (m=128, m_out=64, V KIVI-2)": (qjl_b(q_small), lambda dn, c: qjl.from_dense(dn, q_small, c),
                                            lambda c: qjl.init_qjl_cache(config, 1, c, q_small)),
    }
    if tuner is not None:
        name = f"KVTuner (mean {tuner.average_bits:.2f} code bits, G32 R32, simulated)"
        table[name] = (tuner.bytes_per_token(d),
                       lambda dn, c: kivi.append_dense(kvtuner.init_sim_cache(config, 1, c, tuner), dn),
                       lambda c: kvtuner.init_sim_cache(config, 1, c, tuner))
    return table


@functools.partial(jax.jit, static_argnames=("config",))
def score_chunks(params, cache, tokens, positions, targets, ref_logp, valid, config):
    """Teacher-force `tokens [n_chunks, chunk]` through the cache; per-chunk (nll sum, kl sum)."""
    def body(c, xs):
        tok, pos, tgt, ref, ok = xs
        logits, c, _ = forward(params, tok[None], pos[None], c, config, all_logits=True)
        lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0]
        kl = jnp.sum(jnp.exp(ref) * (ref - lp), axis=-1)
        return c, (jnp.sum(jnp.where(ok, nll, 0.0)), jnp.sum(jnp.where(ok, kl, 0.0)))
    cache, (nll, kl) = jax.lax.scan(body, cache, (tokens, positions, targets, ref_logp, valid))
    return jnp.sum(nll), jnp.sum(kl), cache


def run(args) -> str:
    from kvjax.eval.text import kjv_text
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    jax.config.update("jax_default_matmul_precision", "highest")
    config, params = load_model("smollm2", progress=False)
    tok = load_tokenizer("smollm2")
    n, p, c, fc = args.tokens, args.prefill, args.chunk, args.fake_chunk
    if (n - p) % c or n % fc:
        raise SystemExit("tokens - prefill must be a multiple of chunk, tokens a multiple of fake_chunk")
    ids = np.asarray(tok.encode(kjv_text(n_chars=8 * n))[:n], np.int32)
    if len(ids) < n:
        raise SystemExit(f"only {len(ids)} tokens of text")

    calib_path = pathlib.Path(args.calibration)
    if not calib_path.exists():
        t0 = time.time()
        cal_ids = tok.encode(kjv_text(start_verse=20000, n_chars=8 * args.calib_tokens))[: args.calib_tokens]
        calib = kvquant.calibrate(params, config, cal_ids, kvquant.KVQuantConfig(), (2, 3, 4))
        kvquant.save_calibration(calib_path, calib)
        print(f"calibrated KVQuant on {len(cal_ids)} tokens in {time.time() - t0:.0f} s -> {calib_path}", flush=True)
    calib = kvquant.load_calibration(calib_path)

    # full-precision reference log-probs at every position
    dense = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
    logits, _, _ = forward_jit(params, jnp.asarray(ids[None]), jnp.arange(n, dtype=jnp.int32)[None], dense, config,
                               all_logits=True)
    ref = jax.nn.log_softmax(logits[0], axis=-1)                          # [n, vocab]
    del logits
    targets = np.concatenate([ids[1:], [0]]).astype(np.int32)
    valid = np.arange(n) < n - 1
    ref_nll = -np.asarray(jnp.take_along_axis(ref, jnp.asarray(targets)[:, None], axis=-1))[:, 0]
    base_dec = float(np.exp(ref_nll[p:n - 1].mean()))
    base_fake = float(np.exp(ref_nll[:n - 1].mean()))

    # dense prefill of the first p tokens (shared by every method's decode protocol)
    dp = kvcache.init_cache(config.n_layers, 1, config.n_kv_heads, n, config.head_dim)
    _, dp, _ = forward_jit(params, jnp.asarray(ids[None, :p]), jnp.arange(p, dtype=jnp.int32)[None], dp, config)

    def chunked(lo, size):
        m = (n - lo) // size
        sl = lambda a: jnp.asarray(a[lo:]).reshape((m, size) + a.shape[1:])
        return (sl(ids), sl(np.arange(n, dtype=np.int32)), sl(targets), ref[lo:].reshape(m, size, -1), sl(valid))

    dec_in, fake_in = chunked(p, c), chunked(0, fc)
    rows = []
    tuner = None
    if args.kvtuner:
        import json
        layer_bits = json.loads(pathlib.Path(args.kvtuner).read_text())["layer_bits"]
        tuner = kvtuner.KVTunerConfig(tuple(tuple(p) for p in layer_bits))
    for name, (bpt, convert, init) in method_table(config, calib, tuner).items():
        if args.methods and not any(m.lower() in name.lower() for m in args.methods):
            continue
        t0 = time.time()
        cache = convert(dp, n)
        nll, kl, cache = score_chunks(params, cache, *dec_in, config=config)
        k = n - 1 - p
        ppl_d, kl_d = float(np.exp(float(nll) / k)), float(kl) / k
        mem = cache.memory_bytes()
        nll, kl, _ = score_chunks(params, init(n), *fake_in, config=config)
        ppl_f, kl_f = float(np.exp(float(nll) / (n - 1))), float(kl) / (n - 1)
        rows.append((name, bpt, bpt * 8 / (2 * config.head_dim), ppl_d, 100 * (ppl_d / base_dec - 1), kl_d,
                     ppl_f, 100 * (ppl_f / base_fake - 1), kl_f, mem / 2 ** 20))
        print(f"{name}: decode ppl {ppl_d:.4f} (+{rows[-1][4]:.2f}%) KL {kl_d:.4f} | fake-quant ppl {ppl_f:.4f} "
              f"(+{rows[-1][7]:.2f}%) KL {kl_f:.4f} | {time.time() - t0:.0f} s", flush=True)

    hdr = ("| method | B / token / kv-head | bits / coord | decode ppl | Δppl | mean KL | fake-quant ppl | Δppl | "
           "mean KL | cache MiB at end |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.4f} | {r[4]:+.2f}% | {r[5]:.4f} | {r[6]:.4f} | "
                   f"{r[7]:+.2f}% | {r[8]:.4f} | {r[9]:.2f} |\n" for r in rows)
    table = hdr + body
    doc = (f"# Quantized KV-cache quality on SmolLM2-135M (KJV text)\n\n"
           f"Generated by `benchmarks/quant_quality.py` on {datetime.date.today()} ({jax.default_backend()}, "
           f"float32 model, matmul precision highest).\n\n"
           f"Text: the first {n} tokens of the King James Bible (Genesis 1:1 on). Full-cache perplexity: "
           f"{base_dec:.4f} on the continuation (tokens {p + 1}..{n - 1}), {base_fake:.4f} on all tokens.\n\n"
           f"* **decode**: {p} tokens prefilled in full precision, then quantized (`from_dense`: KIVI's prefill "
           f"rule), then tokens {p}..{n - 1} teacher-forced in chunks of {c} through the quantized cache.\n"
           f"* **fake-quant**: all {n} tokens through the quantized cache from the start, in chunks of {fc}.\n"
           f"* KL = mean KL(full || quantized) of the next-token distributions over the same positions.\n"
           f"* B / token / kv-head counts the quantized representation (codes, scales/mins or norms, outliers, "
           f"per-group indices; fp residual windows excluded), head_dim = {config.head_dim}; the fp32 row is "
           f"the uncompressed float32 cache (bf16 would be half). bits / coord = 8 * B / (2 * head_dim).\n"
           f"* cache MiB: `memory_bytes()` after all {n} tokens, every layer, residual windows included.\n"
           f"* KVQuant calibrated on {args.calib_tokens} KJV tokens from verse 20000 on (k-means LUT per layer, "
           f"uniform weights), 1 outlier above + 1 below per token-head kept exact (3.1 % at d = 64).\n"
           + (f"* KVTuner: per-layer pairs {[tuple(p) for p in tuner.layer_bits]} from the sensitivity search "
              f"(`python -m kvjax.quant.kvtuner search`, KJV verses 20000+), evaluated with the simulated "
              f"(numerically identical, unpacked) cache; B / token is what packed per-layer KIVI would store.\n"
              if tuner is not None else "") + "\n"
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
    ap.add_argument("--calibration", default=os.path.join("/tmp", "kvquant_smollm2_kjv.npz"))
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--methods", nargs="*", default=None, help="substrings of method names to run")
    ap.add_argument("--kvtuner", default=None, help="JSON from `python -m kvjax.quant.kvtuner search --out`")
    ap.add_argument("--out", default="docs/quant_quality.md")
    args = ap.parse_args(argv)
    print(run(args))


if __name__ == "__main__":
    main()
