"""Command line: `python -m kvjax {demo,generate,eval}`."""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp


def _load(model: str):
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    t0 = time.perf_counter()
    config, params = load_model(model)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokenizer = load_tokenizer(model)
    return config, params, tokenizer, time.perf_counter() - t0


def _format_stats(stats: dict) -> str:
    return (f"prompt {stats['prompt_tokens']} tok, prefill {stats['prefill_tok_per_s']:.0f} tok/s "
            f"({stats['prefill_s']:.2f} s) | decode {stats['generated_tokens']} tok at "
            f"{stats['decode_tok_per_s']:.1f} tok/s | cache {stats['cache_bytes'] / 2**20:.1f} MiB "
            f"({stats['cache_capacity']} slots/head, peak {stats['peak_cache_bytes'] / 2**20:.1f} MiB) | "
            f"compression {stats['compression']} | {stats['backend']} {stats['attention']}")


def run_prompt(config, params, tokenizer, prompt: str, *, chat: bool, max_new_tokens: int, **kwargs):
    """Encode (optionally as a ChatML user turn), generate, decode. Returns (answer, stats)."""
    from kvjax.generate import generate
    if not prompt.strip():
        raise ValueError("empty prompt")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tokenizer.encode(text)
    result = generate(params, config, [ids], max_new_tokens, pad_id=tokenizer.pad_id, tokenizer=tokenizer, **kwargs)
    return result.text[0], result.stats


def compression_from_args(args):
    """`--policy NAME --budget B [--when prefill|chunk|decode] [--interval N]` -> Compression or None."""
    if not args.policy:
        return None
    from kvjax.compression import Compression
    from kvjax.policies import Budget, make_policy
    if args.budget is None:
        raise ValueError("--policy needs --budget (a ratio in (0, 1] or a token count)")
    return Compression(make_policy(args.policy), Budget.parse(args.budget), when=args.when,
                       interval=args.interval)


def cmd_generate(args) -> int:
    from kvjax.sampling import Sampling
    config, params, tokenizer, load_s = _load(args.model)
    answer, stats = run_prompt(config, params, tokenizer, args.prompt, chat=args.chat,
                               max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                               sampling=Sampling(args.temperature, args.top_k, args.top_p),
                               seed=args.seed, progress=True, compression=compression_from_args(args))
    print(answer)
    print(f"[{config.name} loaded in {load_s:.1f} s] {_format_stats(stats)}", file=sys.stderr)
    for note in stats["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def demo_long_prompt(tokenizer, target_tokens: int = 1200, passkey: str = "68239") -> str:
    """A passkey hidden at 60% depth of King James Bible text, then the question."""
    from kvjax.eval.text import kjv_text
    text = kjv_text(book="Genesis", n_chars=target_tokens * 4)
    cut = int(len(text) * 0.6)
    cut = text.rfind(". ", 0, cut) + 2
    needle = f"The secret passkey is {passkey}. Remember it: the passkey is {passkey}. "
    return (text[:cut] + needle + text[cut:] + "\n\nWhat is the secret passkey mentioned in the text above?")


def cmd_demo(args) -> int:
    config, params, tokenizer, load_s = _load(args.model)
    print(f"loaded {config.name}: {config.n_layers} layers, {config.n_heads} q / {config.n_kv_heads} kv heads, "
          f"head_dim {config.head_dim} in {load_s:.1f} s on {jax.default_backend()}")
    question = "What is the capital of France?"
    answer, stats = run_prompt(config, params, tokenizer, question, chat=True, max_new_tokens=48)
    print(f"\n>>> {question}\n{answer.strip()}\n  ({_format_stats(stats)}; first call includes compilation)")
    long_prompt = demo_long_prompt(tokenizer)
    answer, stats = run_prompt(config, params, tokenizer, long_prompt, chat=True, max_new_tokens=32,
                               chunk_size=256, progress=True)
    print(f"\n>>> [{stats['prompt_tokens']}-token passage with a hidden passkey 68239] "
          f"What is the secret passkey?\n{answer.strip()}\n  ({_format_stats(stats)})")
    # The same long prompt with SnapKV keeping 25% of the context (question-aware: the question is
    # the observation window at the end of the prompt).
    from kvjax.compression import Compression
    from kvjax.policies import Budget, make_policy
    snap = Compression(make_policy("snapkv"), Budget(ratio=0.25))
    answer, stats = run_prompt(config, params, tokenizer, long_prompt, chat=True, max_new_tokens=32,
                               compression=snap, progress=True)
    print(f"\n>>> same passage, SnapKV keeping 25% of the KV cache\n{answer.strip()}\n  ({_format_stats(stats)})")
    return 0


def _names(spec: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in spec.split(",") if x.strip())


def eval_config_from_args(args):
    """EvalConfig from the `eval` arguments; ValueError on unknown policies, budgets <= 0, ..."""
    from kvjax.eval.harness import EvalConfig, parse_budgets
    from kvjax.policies import POLICIES
    policies = tuple(POLICIES) if args.policy == "all" else _names(args.policy)
    regime_policies = []
    for regime, spec in (("chunk", args.chunk_policies), ("decode", args.decode_policies)):
        if spec:
            regime_policies.append((regime, tuple(POLICIES) if spec == "all" else _names(spec)))
    return EvalConfig(policies=policies, budgets=parse_budgets(args.budget), regimes=_names(args.regime),
                      chunk_size=args.chunk_size, interval=args.interval, context_tokens=args.context_tokens,
                      continuation_tokens=args.continuation_tokens, needle_tasks=_names(args.needle),
                      needle_per_kind=args.needle_samples, needle_tokens=args.needle_tokens,
                      needle_query_aware=args.needle_query_aware, seed=args.seed,
                      stepwise=args.continuation_mode == "step", decode_probe=args.decode_probe,
                      regime_policies=tuple(regime_policies))


def cmd_eval(args) -> int:
    from kvjax.eval.harness import run_grid
    from kvjax.eval.text import kjv_text, read_text_file
    ecfg = eval_config_from_args(args)  # validate before loading anything
    text = read_text_file(args.text_file) if args.text_file else kjv_text(n_chars=(ecfg.context_tokens + ecfg.continuation_tokens) * 8)
    config, params, tokenizer, load_s = _load(args.model)
    print(f"loaded {config.name} in {load_s:.1f} s on {jax.default_backend()}", file=sys.stderr)
    command = "python -m kvjax " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "python -m kvjax eval"
    rows = run_grid(params, config, tokenizer, text, ecfg, out_dir=args.out or None, progress=True,
                    model_name=args.model, extra_meta={"command": f"`{command}`",
                                                       "text": args.text_file or "King James Bible (Genesis on)"})
    from kvjax.eval.harness import markdown_table
    print(markdown_table(rows))
    for r in rows:
        if r["notes"]:
            print(f"note: {r['policy']} {r['budget']} {r['regime']}: {r['notes']}", file=sys.stderr)
    if args.out:
        print(f"wrote {args.out}/results.csv, results.md, results.png", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="chat and long-context demo on the embedded SmolLM2")
    demo.add_argument("--model", default="smollm2")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate a continuation or a chat answer")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", default="smollm2", help="preset name, .gguf file or safetensors directory")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chunk-size", type=int, default=None, help="prefill in chunks of N tokens")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--policy", default=None, help="compression policy name (see kvjax.policies.POLICIES)")
    gen.add_argument("--budget", default=None, help="kept tokens per head: ratio (0.25) or count (512)")
    gen.add_argument("--when", default="prefill", choices=["prefill", "chunk", "decode"],
                     help="compress once after prefill, after every prefill chunk, or during decode")
    gen.add_argument("--interval", type=int, default=64, help="decode steps between decode-time compressions")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="fidelity (KL, perplexity), needle tasks, memory and time per policy x budget x regime")
    ev.add_argument("--model", default="smollm2", help="preset name, .gguf file or safetensors directory")
    ev.add_argument("--policy", default="all", help="comma-separated registered policies, or 'all'")
    ev.add_argument("--budget", default="0.5,0.25,0.1", help="comma-separated: ratios (<= 1) or token counts (> 1)")
    ev.add_argument("--regime", default="prefill", help="comma-separated subset of prefill,chunk,decode")
    ev.add_argument("--chunk-policies", default="", help="restrict the chunk regime to these policies")
    ev.add_argument("--decode-policies", default="", help="restrict the decode regime to these policies")
    ev.add_argument("--chunk-size", type=int, default=256)
    ev.add_argument("--interval", type=int, default=64, help="decode regime: compress every N new tokens")
    ev.add_argument("--context-tokens", type=int, default=1600)
    ev.add_argument("--continuation-tokens", type=int, default=128)
    ev.add_argument("--continuation-mode", choices=("step", "forward"), default="forward",
                    help="feed the continuation as decode steps or in one forward (decode regime: always steps)")
    ev.add_argument("--decode-probe", type=int, default=16,
                    help="with --continuation-mode forward: time this many decode steps for decode ms/tok")
    ev.add_argument("--text-file", default=None, help="UTF-8 text for the fidelity context (default: KJV)")
    ev.add_argument("--needle", default="passkey,kv", help="needle tasks (comma-separated), '' for none")
    ev.add_argument("--needle-samples", type=int, default=2, help="samples per needle task")
    ev.add_argument("--needle-tokens", type=int, default=1024)
    ev.add_argument("--needle-query-aware", action="store_true",
                    help="compress the prompt with the question in it (default: compress the haystack, then ask)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="docs/eval", help="output folder for results.csv/.md/.png ('' for none)")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
