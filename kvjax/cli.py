"""Command line: `python -m kvjax {demo,generate,eval}`."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def resolve_dtype(text: Optional[str]):
    """`--dtype`: auto (bfloat16 on gpu/tpu, float32 on cpu) | bfloat16 | float32."""
    from models.loading import parse_dtype
    if text in (None, "", "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return parse_dtype(text)


def check_attention(name: str) -> str:
    """`--attention`: one clear line for an unknown value or a Pallas backend with no kernels here."""
    from kvjax.attention import check_backend
    check_backend(name)
    if name == "pallas" and jax.default_backend() == "cpu":
        raise ValueError("--attention pallas: the Pallas kernels need a gpu or tpu; on cpu use 'interpret' "
                         "(kernels interpreted, slow) or 'auto'/'xla'")
    return name


def _load(model: str, dtype=None):
    from models.loading import load_model
    from models.tokenizer import load_tokenizer
    t0 = time.perf_counter()
    config, params = load_model(model, dtype=resolve_dtype(dtype))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokenizer = load_tokenizer(model)
    return config, params, tokenizer, time.perf_counter() - t0


def _format_stats(stats: dict) -> str:
    return (f"prompt {stats['prompt_tokens']} tok, prefill {stats['prefill_tok_per_s']:.0f} tok/s "
            f"({stats['prefill_s']:.2f} s) | decode {stats['generated_tokens']} tok at "
            f"{stats['decode_tok_per_s']:.1f} tok/s | cache {stats['cache_bytes'] / 2**20:.1f} MiB "
            f"({stats['cache_capacity']} slots/head, peak {stats['peak_cache_bytes'] / 2**20:.1f} MiB"
            + (f", +{stats['query_buffer_bytes'] / 2**20:.1f} MiB decode query buffer"
               if stats.get("query_buffer_bytes") else "") + ") | "
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


def sparse_prefill_from_args(args):
    """`--prefill-attention block_sparse:<method>[:k=v,...]` -> a kvjax.sparse_prefill method or None."""
    spec = getattr(args, "prefill_attention", None)
    if not spec or spec == "dense":
        return None
    from kvjax.sparse_prefill import make_sparse_prefill
    return make_sparse_prefill(spec)


def compression_from_args(args, params=None, config=None):
    """`--policy NAME[:key=value...] --budget B [--when prefill|chunk|decode] [--interval N]` ->
    Compression or None (params + config: RazorAttention's head search, AdaKV/PyramidKV sizes)."""
    if not args.policy:
        return None
    from kvjax.compression import Compression
    from kvjax.eval.harness import build_policy
    from kvjax.policies import Budget
    from kvjax.budget_parse import parse_budget
    if args.budget is None:
        raise ValueError("--policy needs --budget (a ratio in (0, 1] or a token count)")
    return Compression(build_policy(args.policy, params, config), parse_budget(args.budget), when=args.when,
                       interval=args.interval, demote=getattr(args, "demote", None) or None)


def check_generate_args(args) -> None:
    """Input errors of `generate` that need no model (raised before loading it)."""
    from kvjax.budget_parse import parse_budget
    from kvjax.eval.harness import is_locret, parse_policy, quant_cache_init
    check_attention(args.attention)
    resolve_dtype(args.dtype)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.chunk_size is not None and args.chunk_size <= 0:
        raise ValueError(f"--chunk-size must be positive, got {args.chunk_size}")
    if not args.prompt.strip():
        raise ValueError("empty prompt")
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, got {args.interval}")
    from kvjax.sampling import Sampling
    Sampling(args.temperature, args.top_k, args.top_p)        # its range checks, before loading
    if not args.policy and (args.when != "prefill" or args.budget is not None):
        raise ValueError("--when and --budget apply to a compression policy: give --policy NAME")
    if args.policy:
        parse_policy(args.policy)
        if args.budget is None:
            raise ValueError("--policy needs --budget (a ratio in (0, 1] or a token count)")
        parse_budget(args.budget)
    if args.policy and is_locret(args.policy):
        if not args.heads:
            raise ValueError("--policy locret needs --heads PATH (a directory exported by `python -m train.locret`)")
        if args.when != "prefill" or args.kv_quant:
            raise ValueError("--policy locret runs its own chunked prefill (chunk = --chunk-size) and plain "
                             "decode: --when and --kv-quant do not apply")
    elif args.heads:
        raise ValueError("--heads is only used with --policy locret")
    if args.kv_quant:
        init = quant_cache_init(args.kv_quant)
        if args.policy:   # eviction x quantization: refused combinations name their reason before loading
            from kvjax.policies import POLICIES
            from kvjax.quant.evicted import check_cache_init, check_policy_class
            check_cache_init(init)
            name = parse_policy(args.policy)[0]
            check_policy_class(POLICIES[name.lower().replace("-", "_")])
    if getattr(args, "demote", None):   # evicted tokens at low precision: refusals before loading the model
        if not args.policy:
            raise ValueError("--demote stores the evicted tokens of a --policy at low precision: give --policy NAME")
        from kvjax.policies import POLICIES
        from kvjax.quant.demote import check_demote_class, demote_store
        demote_store(args.demote)
        if args.when != "prefill":
            raise ValueError(f"--demote runs once after the prefill: --when prefill, got {args.when}")
        check_demote_class(POLICIES[parse_policy(args.policy)[0].lower().replace("-", "_")])
    if getattr(args, "quantized_prefill", False) and (not args.kv_quant or args.policy):
        raise ValueError("--quantized-prefill applies to --kv-quant kivi* without --policy")
    mesh_kwargs(args)   # --mesh: malformed, or more devices than there are
    if getattr(args, "nsa", None):
        import pathlib
        if not (pathlib.Path(args.nsa) / "meta.json").is_file():
            raise FileNotFoundError(f"--nsa {args.nsa}: not an NSA export (python -m train.nsa writes <out>/nsa)")
        used = [flag for flag, on in (("--policy", args.policy), ("--kv-quant", args.kv_quant),
                                      ("--selection", args.selection), ("--mesh", args.mesh),
                                      ("--prefill-attention", args.prefill_attention not in (None, "dense")))
                if on]
        if used:
            raise ValueError(f"--nsa runs NSA attention alone: {', '.join(used)} not supported with it")
    if getattr(args, "mesh", None) and args.policy and is_locret(args.policy):
        raise ValueError("--mesh is not supported with --policy locret (its own prefill loop runs on one device)")


def run_locret(config, params, tokenizer, args):
    """`generate --policy locret --heads PATH`: Locret's chunked prefill with the trained heads, then
    plain decode (`kvjax.policies.locret.locret_generate`). Returns (answer, stats line)."""
    from kvjax.eval.harness import locret_policy
    from kvjax.policies import Budget
    from kvjax.policies.locret import load_heads, locret_generate
    from kvjax.sampling import Sampling
    heads = load_heads(args.heads, config)
    if not args.prompt.strip():
        raise ValueError("empty prompt")
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tokenizer.encode(text)
    policy = locret_policy(args.policy, Budget.parse(args.budget), len(ids), args.chunk_size or 256)
    t0 = time.perf_counter()
    out = locret_generate(params, config, heads, ids, policy, args.max_new_tokens, seed=args.seed,
                          sampling=Sampling(args.temperature, args.top_k, args.top_p),
                          eos_ids=tuple(tokenizer.stop_ids))
    secs = time.perf_counter() - t0
    return (tokenizer.decode(out, skip_special_tokens=True),
            f"prompt {len(ids)} tok | locret budget {policy.budget}+{policy.n_local} local, chunk {policy.chunk}, "
            f"{policy.n_stabilizers} stabilizers | {len(out)} tok in {secs:.2f} s (compilation included)")


def selection_from_args(args):
    """`--selection quest|tokenselect|shadowkv --token-budget N` -> a kvjax.selection selector or None."""
    if not getattr(args, "selection", None):
        return None
    from kvjax.selection import make_selection
    return make_selection(args.selection, budget=args.token_budget)


def cmd_generate(args) -> int:
    from kvjax.sampling import Sampling
    check_generate_args(args)
    selection = selection_from_args(args)   # errors before loading the model
    sparse_prefill = sparse_prefill_from_args(args)
    config, params, tokenizer, load_s = _load(args.model, args.dtype)
    from kvjax.eval.harness import is_locret, quant_cache_init
    cache_init = quant_cache_init(args.kv_quant) if args.kv_quant else None
    if getattr(args, "nsa", None):
        from kvjax.nsa_cache import load_engine
        params, cache_init = load_engine(args.nsa, config, params)
    if args.policy and is_locret(args.policy):
        answer, line = run_locret(config, params, tokenizer, args)
        print(answer)
        print(f"[{config.name} loaded in {load_s:.1f} s] {line}", file=sys.stderr)
        return 0
    answer, stats = run_prompt(config, params, tokenizer, args.prompt, chat=args.chat,
                               max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                               sampling=Sampling(args.temperature, args.top_k, args.top_p),
                               seed=args.seed, progress=True,
                               compression=compression_from_args(args, params, config), attention=args.attention,
                               cache_init=cache_init,
                               **({"quantized_prefill": True} if args.quantized_prefill else {}),
                               **mesh_kwargs(args),
                               **({"selection": selection} if selection is not None else {}),
                               **({"prefill_attention": sparse_prefill} if sparse_prefill is not None else {}))
    print(answer)
    quant = f" | kv-quant {args.kv_quant}" if args.kv_quant else ""
    print(f"[{config.name} loaded in {load_s:.1f} s] {_format_stats(stats)}{quant}", file=sys.stderr)
    if "read_bytes_per_step" in stats:
        rb = stats["read_bytes_per_step"]
        print(f"selection {stats['selection']}: a decode step reads {rb['selected'] / 2**20:.2f} MiB of K/V + "
              f"metadata vs {rb['dense'] / 2**20:.2f} MiB dense ({rb['ratio']:.3f})", file=sys.stderr)
    for note in tuple(stats["notes"]) + tuple(stats.get("sharding_notes", ())):
        print(f"note: {note}", file=sys.stderr)
    return 0


def mesh_kwargs(args) -> dict:
    """`--mesh data=N,model=M` -> {"mesh": Mesh} for generate (ValueError when too few devices)."""
    if not getattr(args, "mesh", None):
        return {}
    from kvjax.sharding import make_mesh
    return {"mesh": make_mesh(args.mesh)}


def demo_long_prompt(tokenizer, target_tokens: int = 1200, passkey: str = "68239") -> str:
    """A passkey hidden at 60% depth of King James Bible text, then the question."""
    from kvjax.eval.text import kjv_text
    text = kjv_text(book="Genesis", n_chars=target_tokens * 4)
    cut = int(len(text) * 0.6)
    cut = text.rfind(". ", 0, cut) + 2
    needle = f"The secret passkey is {passkey}. Remember it: the passkey is {passkey}. "
    return (text[:cut] + needle + text[cut:] + "\n\nWhat is the secret passkey mentioned in the text above?")


def cmd_demo(args) -> int:
    check_attention(args.attention)
    config, params, tokenizer, load_s = _load(args.model, args.dtype)
    print(f"loaded {config.name}: {config.n_layers} layers, {config.n_heads} q / {config.n_kv_heads} kv heads, "
          f"head_dim {config.head_dim} in {load_s:.1f} s on {jax.default_backend()}")
    question = "What is the capital of France?"
    answer, stats = run_prompt(config, params, tokenizer, question, chat=True, max_new_tokens=48,
                               attention=args.attention)
    print(f"\n>>> {question}\n{answer.strip()}\n  ({_format_stats(stats)}; first call includes compilation)")
    # The passkey prompt with the full cache, SnapKV and H2O at 25% (kvjax.demo): SnapKV (scores
    # from the last 64 prompt queries, the question among them) loses the passkey on this model,
    # H2O (attention summed over every prompt query) keeps it; KL and memory side by side.
    from kvjax.compression import Compression
    from kvjax.demo import compare_caches, format_compared
    from kvjax.policies import Budget, make_policy
    long_prompt = demo_long_prompt(tokenizer)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": long_prompt}]))
    methods = {"full cache": None,
               "SnapKV 25%": Compression(make_policy("snapkv"), Budget(ratio=0.25)),
               "H2O 25%": Compression(make_policy("h2o"), Budget(ratio=0.25))}
    rows = compare_caches(params, config, tokenizer, ids, methods, expected="68239", attention=args.attention)
    print(f"\n>>> [{len(ids)}-token passage with a hidden passkey 68239] What is the secret passkey? "
          f"(KL to the full cache on its answer tokens)")
    for row in rows:
        print(format_compared(row, rows[0].cache_bytes))
    return 0


def _names(spec: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in spec.split(",") if x.strip())


def expand_policies(spec: str, heads: str = "", notes: Optional[list] = None) -> tuple[str, ...]:
    """Comma-separated policy specs; 'all' expands to every registered policy that can be built
    from the model alone (RazorAttention finds its heads; DuoAttention needs a trained pattern,
    so give it as 'duo_attention:pattern_file=PATH'), plus Locret when `heads` is given."""
    from kvjax.policies import NEEDS_PATTERN, POLICIES
    out: list[str] = []
    for name in _names(spec):
        if name != "all":
            out.append(name)
            continue
        for key in POLICIES:
            if key in NEEDS_PATTERN:
                if notes is not None and not any(n.split(":")[0] == key for n in _names(spec)):
                    notes.append(f"'all' skips {key}: it needs a per-head pattern "
                                 f"(add '{key}:pattern_file=PATH.json')")
                continue
            out.append(key)
        if heads:
            out.append("locret")
        elif notes is not None:
            notes.append("'all' skips locret: give --heads PATH")
    return tuple(dict.fromkeys(out))


def eval_config_from_args(args, notes: Optional[list] = None):
    """EvalConfig from the `eval` arguments; ValueError on unknown policies, budgets <= 0, ..."""
    from kvjax.eval.harness import EvalConfig, parse_budgets
    policies = expand_policies(args.policy, args.heads, notes)
    regime_policies = []
    for regime, spec in (("chunk", args.chunk_policies), ("decode", args.decode_policies)):
        if spec:
            regime_policies.append((regime, expand_policies(spec, args.heads)))
    check_eval_mesh(args, policies)
    return EvalConfig(policies=policies, budgets=parse_budgets(args.budget), regimes=_names(args.regime),
                      chunk_size=args.chunk_size, interval=args.interval,
                      context_tokens=args.context_tokens or DEFAULT_CONTEXT,
                      continuation_tokens=args.continuation_tokens or DEFAULT_CONTINUATION,
                      needle_tasks=_names(args.needle),
                      needle_per_kind=args.needle_samples, needle_tokens=args.needle_tokens,
                      needle_query_aware=args.needle_query_aware, seed=args.seed,
                      stepwise=args.continuation_mode == "step", decode_probe=args.decode_probe,
                      regime_policies=tuple(regime_policies), locret_heads=args.heads or "",
                      kv_quant=_names(args.kv_quant), combine=bool(args.kv_quant) and bool(policies),
                      demote=_names(args.demote))


def check_eval_mesh(args, policies: Sequence[str]) -> None:
    """`eval --mesh`: well formed, data=1 (the fidelity task is one row), no Locret rows (ValueError)."""
    if not getattr(args, "mesh", None):
        return
    from kvjax.eval.harness import is_locret
    from kvjax.sharding import parse_mesh
    if parse_mesh(args.mesh)["data"] != 1:
        raise ValueError(f"eval --mesh {args.mesh}: the fidelity task is one row (batch 1), so the data axis must "
                         f"be 1 (e.g. --mesh model=4)")
    if any(is_locret(p) for p in policies):
        raise ValueError("eval --mesh does not run Locret rows (its own prefill loop runs on one device)")


def _git_commit() -> str:
    """The kvjax checkout's commit (+ "dirty" with uncommitted changes), or "unknown"."""
    import pathlib
    import subprocess
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + (" (uncommitted changes present)" if dirty else "")) if sha else "unknown"


DEFAULT_CONTEXT, DEFAULT_CONTINUATION = 1600, 128


def fresh_run_dir(root: str = "runs/eval") -> str:
    """`runs/eval/YYYYmmdd-HHMMSS[-n]`, a folder that does not exist yet (eval's default --out:
    the committed results under docs/ are only written when asked for)."""
    import datetime
    import pathlib
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = pathlib.Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = pathlib.Path(root) / f"{stamp}-{n}"
    return str(path)


def eval_tokens(args, tokenizer, notes: list) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for `eval`, before the model loads:
    --context-file/--continuation-file: each file whole (or cut to the given counts);
    --text-file: the file's first --context-tokens and next --continuation-tokens tokens, derived
    from its length when not given (continuation min(128, 1/8 of the file), context the rest up to
    1600, with a note); default: the King James Bible at 1600 + 128 tokens."""
    from kvjax.eval.fidelity import split_text
    from kvjax.eval.text import kjv_text, read_text_file
    if args.context_file or args.continuation_file:
        if not (args.context_file and args.continuation_file) or args.text_file:
            raise ValueError("give --context-file and --continuation-file together (and no --text-file)")
        ctx = tokenizer.encode(read_text_file(args.context_file))
        cont = tokenizer.encode(read_text_file(args.continuation_file))
        for flag, ids, want in (("--context-tokens", ctx, args.context_tokens),
                                ("--continuation-tokens", cont, args.continuation_tokens)):
            if want and want > len(ids):
                raise ValueError(f"{flag} {want}: the file has only {len(ids)} tokens")
        return ctx[:args.context_tokens or len(ctx)], cont[:args.continuation_tokens or len(cont)]
    if not args.text_file:
        c, n = args.context_tokens or DEFAULT_CONTEXT, args.continuation_tokens or DEFAULT_CONTINUATION
        return split_text(tokenizer, kjv_text(n_chars=(c + n) * 8), c, n)
    ids = tokenizer.encode(read_text_file(args.text_file))
    cont = args.continuation_tokens or min(DEFAULT_CONTINUATION, len(ids) // 8)
    ctx = args.context_tokens or min(DEFAULT_CONTEXT, len(ids) - cont)
    if not args.context_tokens or not args.continuation_tokens:
        notes.append(f"{args.text_file}: {len(ids)} tokens -> context {ctx} + continuation {cont} tokens "
                     f"(--context-tokens / --continuation-tokens to choose)")
    if min(ctx, cont) <= 0:
        raise ValueError(f"text file {args.text_file} has only {len(ids)} tokens: too short to evaluate")
    if ctx + cont > len(ids):
        raise ValueError(f"text file {args.text_file} has {len(ids)} tokens, need {ctx + cont} (context {ctx} + "
                         f"continuation {cont}): lower --context-tokens / --continuation-tokens or leave them out")
    return ids[:ctx], ids[ctx:ctx + cont]


def cmd_eval(args) -> int:
    import dataclasses
    from kvjax.eval.harness import run_grid
    from kvjax.eval.needle import text_filler
    from kvjax.eval.text import read_text_file
    from models.tokenizer import load_tokenizer
    notes: list[str] = []
    ecfg = eval_config_from_args(args, notes)  # validate before loading anything
    mesh = mesh_kwargs(args)                    # more devices than there are
    resolve_dtype(args.dtype)
    tokenizer = load_tokenizer(args.model)    # cheap: sizes are checked before the model loads
    ctx, cont = eval_tokens(args, tokenizer, notes)
    ecfg = dataclasses.replace(ecfg, context_tokens=len(ctx), continuation_tokens=len(cont))
    user_text = args.text_file or args.context_file
    if user_text and ecfg.needle_tasks:
        ecfg = dataclasses.replace(ecfg, needle_filler=text_filler(read_text_file(user_text)))
        notes.append(f"needle tasks hide their needles in sentences of {user_text}")
    out = fresh_run_dir() if args.out is None else args.out
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    config, params, _, load_s = _load(args.model, args.dtype)
    print(f"loaded {config.name} in {load_s:.1f} s on {jax.default_backend()}", file=sys.stderr)
    command = "python -m kvjax " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "python -m kvjax eval"
    source = (f"{args.context_file} + {args.continuation_file}" if args.context_file else
              args.text_file or "King James Bible (Genesis on)")
    rows = run_grid(params, config, tokenizer, "", ecfg, out_dir=out or None, progress=True,
                    model_name=args.model, tokens=(ctx, cont),
                    extra_meta={"command": f"`{command}`", "text": source, "commit": _git_commit()}, **mesh)
    from kvjax.eval.harness import markdown_table
    print(markdown_table(rows))
    for r in rows:
        if r["notes"]:
            print(f"note: {r['policy']} {r['budget']} {r['regime']}: {r['notes']}", file=sys.stderr)
    if out:
        print(f"wrote {out}/results.csv, results.md, results.png", file=sys.stderr)
    return 0


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto",
                   help="parameters and cache: auto (bfloat16 on gpu/tpu, float32 on cpu), bfloat16 or float32")
    p.add_argument("--attention", default="auto", help="attention implementation: auto (Pallas kernels on "
                   "gpu/tpu, XLA on cpu), xla, pallas, interpret (GPU kernels interpreted, for checks on cpu)")


HELP = argparse.ArgumentDefaultsHelpFormatter   # --help shows every default
BUDGET_HELP = ("0.25 or 25%%: a ratio of the prompt; 512 or 512tok: tokens per head; 1 (or 100%%) keeps the whole "
               "context; a non-integer above 1 (1.5) is an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=HELP, help="chat and long-context demo on the embedded SmolLM2")
    demo.add_argument("--model", default="smollm2", help="preset name, .gguf file or safetensors directory")
    _engine_args(demo)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", formatter_class=HELP, help="generate a continuation or a chat answer")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--model", default="smollm2", help="preset name, .gguf file or safetensors directory")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--chunk-size", type=int, default=None, help="prefill in chunks of N tokens (None: one forward up to 512 tokens on cpu / 4096 on gpu, ~equal chunks above)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--policy", default=None, help="compression policy name (see kvjax.policies.POLICIES)")
    gen.add_argument("--budget", default=None, help="kept tokens per head: " + BUDGET_HELP)
    gen.add_argument("--when", default="prefill", choices=["prefill", "chunk", "decode"],
                     help="compress once after prefill, after every prefill chunk, or during decode")
    gen.add_argument("--interval", type=int, default=64, help="decode steps between decode-time compressions")
    gen.add_argument("--selection", default=None, help="query-aware sparse decode: quest | tokenselect | shadowkv "
                     "(kvjax.selection; the full cache is kept, each step attends to the selected tokens)")
    gen.add_argument("--prefill-attention", default="dense", help="dense, or block-sparse prefill: "
                     "block_sparse:flexprefill|minference|a_shape|streaming[:key=value,...] (kvjax.sparse_prefill; "
                     "e.g. block_sparse:flexprefill:gamma=0.95, block_sparse:streaming:pattern_file=docs/duo/pattern.json)")
    gen.add_argument("--token-budget", type=int, default=1024, help="--selection: attended tokens per kv head")
    gen.add_argument("--heads", default=None, help="--policy locret: directory of trained retaining heads")
    gen.add_argument("--mesh", default=None, help="shard over a device mesh, e.g. data=1,model=3 (kvjax.sharding): "
                     "batch over data, heads over model")
    gen.add_argument("--kv-quant", default=None,
                     help="quantized KV cache from kvjax.quant (e.g. kivi2, kivi4, kivi2:residual=64)")
    gen.add_argument("--demote", default=None,
                     help="--policy: keep the evicted tokens at low precision instead of dropping them (MiKV-style; "
                     "kivi2, kivi4, kivi2:group=32; kvjax.quant.demote); kept tokens bf16, or --kv-quant's")
    gen.add_argument("--quantized-prefill", action="store_true",
                     help="--kv-quant kivi*: append each prefill chunk quantized (peak = the quantized cache) "
                     "instead of prefilling in full precision beside it (KIVI's rule, the default)")
    gen.add_argument("--nsa", default=None, help="NSA attention (kvjax.nsa_cache): directory of trained NSA weights "
                     "exported by `python -m train.nsa` (<out>/nsa; its backbone too when it was trained)")
    _engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", formatter_class=HELP, help="fidelity (KL, perplexity), needle tasks, memory "
                        "and time per policy x budget x regime")
    ev.add_argument("--model", default="smollm2", help="preset name, .gguf file or safetensors directory")
    ev.add_argument("--policy", default="all",
                    help="comma-separated policy specs (name[:key=value...]), 'all' (every policy buildable from "
                         "the model; duo_attention only as duo_attention:pattern_file=PATH), 'locret' (needs --heads)")
    ev.add_argument("--heads", default=None, help="Locret's trained retaining heads (rows in the chunk regime)")
    ev.add_argument("--kv-quant", default="", help="quantized-cache rows at the full token budget, e.g. kivi2,kivi4; "
                    "with --policy also every policy x kv-quant x budget (policy+kivi4 rows: eviction x quantization)")
    ev.add_argument("--demote", default="", help="also every policy x budget with its evicted tokens kept at low "
                    "precision (prefill regime), e.g. kivi2,kivi2:budget=0.2 (policy~kivi2 rows; kvjax.quant.demote)")
    ev.add_argument("--budget", default="0.5,0.25,0.1", help="comma-separated budgets, each " + BUDGET_HELP)
    ev.add_argument("--regime", default="prefill", help="comma-separated subset of prefill,chunk,decode")
    ev.add_argument("--chunk-policies", default="", help="restrict the chunk regime to these policies")
    ev.add_argument("--decode-policies", default="", help="restrict the decode regime to these policies")
    ev.add_argument("--chunk-size", type=int, default=256, help="chunk regime: prefill chunk in tokens")
    ev.add_argument("--interval", type=int, default=64, help="decode regime: compress every N new tokens")
    ev.add_argument("--context-tokens", type=int, default=None,
                    help="context length (default: 1600, or derived from --text-file's length)")
    ev.add_argument("--continuation-tokens", type=int, default=None,
                    help="continuation length (default: 128, or derived from --text-file's length)")
    ev.add_argument("--context-file", default=None, help="UTF-8 text used whole as the context")
    ev.add_argument("--continuation-file", default=None, help="UTF-8 text used whole as the continuation")
    ev.add_argument("--continuation-mode", choices=("step", "forward"), default="forward",
                    help="feed the continuation as decode steps or in one forward (decode regime: always steps)")
    ev.add_argument("--decode-probe", type=int, default=16,
                    help="with --continuation-mode forward: time this many decode steps for decode ms/tok")
    ev.add_argument("--text-file", default=None,
                    help="UTF-8 text for the fidelity context and continuation and the needle filler (default: KJV)")
    ev.add_argument("--needle", default="passkey,kv", help="needle tasks (comma-separated), '' for none")
    ev.add_argument("--needle-samples", type=int, default=2, help="samples per needle task")
    ev.add_argument("--needle-tokens", type=int, default=1024, help="prompt length of each needle sample")
    ev.add_argument("--needle-query-aware", action="store_true",
                    help="compress the prompt with the question in it (default: compress the haystack, then ask)")
    ev.add_argument("--seed", type=int, default=0, help="needle sampling seed")
    ev.add_argument("--out", default=None, help="output folder for results.csv/.md/.png (default: a new "
                    "runs/eval/DATE-TIME folder; '' for none; docs/eval holds the committed results)")
    ev.add_argument("--dtype", default="auto",
                    help="parameters and cache: auto (bfloat16 on gpu/tpu, float32 on cpu), bfloat16 or float32")
    ev.add_argument("--mesh", default=None, help="shard over a device mesh (kvjax.sharding), e.g. model=4: "
                    "parameters and caches over 'model' (kv heads); the fidelity task has batch 1, so data=1")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
