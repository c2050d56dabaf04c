"""The evaluation grid: policies x budgets x regimes against the full cache, as one table.

    rows = run_grid(params, config, tokenizer, text, EvalConfig(policies=("snapkv", "h2o")), out_dir="docs/eval")

For every (policy, budget, regime) -- regime = when the `kvjax.compression.Compression` acts:
"prefill" (once after the prompt), "chunk" (after every prefill chunk) or "decode" (after prefill
and whenever the decode room fills) -- the row reports (DESIGN.md §Evaluation):

  kl, ppl        fidelity on a teacher-forced continuation of real text (`kvjax.eval.fidelity`)
  needle_*       passkey / key-value retrieval: answer log-prob, teacher-forced accuracy, greedy
                 exact match (`kvjax.eval.needle`); by default question-agnostic (the haystack is
                 compressed, then question + answer are fed over the compressed cache, as kvpress
                 does); `needle_query_aware` compresses the prompt with the question in it
  cache_bytes    bytes allocated for the cache during the continuation (peak_cache_bytes: the
                 largest cache allocated, prefill included)
  prefill_s, decode_ms_per_tok   execution time on the running backend, compilation excluded

The full cache is always the first row. Rows sharing a prefill (regimes "prefill"/"decode" of
policies that observe the same things) reuse one forward over the context; the time of that
forward is reported in each of them. A policy that fails (e.g. one that needs observations a
regime does not provide) gets a row with the error in `notes`, printed as a warning too.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import pathlib
import time
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import sharding
from kvjax.compression import WHEN, Compression
from kvjax.eval import fidelity, needle
from kvjax.policies import POLICIES, make_policy
from kvjax.policies.base import Budget
from models.config import ModelConfig
from kvjax.observation import Observe

COLUMNS = ("policy", "budget", "regime", "kept", "kl", "kl_max", "ppl", "needle_logprob", "needle_acc",
           "needle_exact", "passkey_logprob", "passkey_exact", "kv_logprob", "kv_exact", "cache_bytes",
           "peak_cache_bytes", "prefill_s", "decode_ms_per_tok", "needle_prefill_s", "notes")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. stepwise: feed the continuation as decode steps (else one forward; the
    "decode" regime is always stepwise); decode_probe: when not stepwise, time this many real
    decode steps for `decode_ms_per_tok` (0: skip). policies: registry names, optionally with hyperparameters
    ("snapkv:window=32"); budgets: ratios (<= 1) or token counts; regimes: subset of
    compression.WHEN; regime_policies: optional ((regime, (policy, ...)), ...) restricting a
    regime to some policies (default: every policy in every regime)."""

    policies: tuple[str, ...] = ("snapkv",)
    budgets: tuple[Budget, ...] = (Budget(ratio=0.5), Budget(ratio=0.25), Budget(ratio=0.1))
    regimes: tuple[str, ...] = ("prefill",)
    chunk_size: int = 256
    interval: int = 64
    context_tokens: int = 1600
    continuation_tokens: int = 128
    needle_tasks: tuple[str, ...] = ("passkey", "kv")
    needle_per_kind: int = 2
    needle_tokens: int = 1024
    needle_depths: tuple[float, float] = (0.5, 0.9)
    needle_query_aware: bool = False
    seed: int = 0
    stepwise: bool = False
    decode_probe: int = 16
    regime_policies: tuple[tuple[str, tuple[str, ...]], ...] = ()
    locret_heads: str = ""
    kv_quant: tuple[str, ...] = ()
    needle_filler: tuple[str, ...] = ()   # filler sentences (needle.text_filler); () = synthetic filler
    combine: bool = False   # also every policy x kv_quant x budget x regime: "snapkv+kivi4" rows (kvjax.quant.evicted)
    demote: tuple[str, ...] = ()   # also every policy x demote x budget, prefill regime: "snapkv~kivi2" rows

    def __post_init__(self):
        if not self.policies and not self.kv_quant:
            raise ValueError("no policies given")
        for name in self.policies:
            parse_policy(name)
        names = list(self.policies) + [n for _, ns in self.regime_policies for n in ns]
        if any(is_locret(n) for n in names) and not self.locret_heads:
            raise ValueError("policy locret needs its trained retaining heads: --heads PATH (locret_heads=...)")
        for spec in self.kv_quant:
            quant_cache_init(spec)  # unknown names / options fail here, before anything runs
        if self.demote:
            from kvjax.quant.demote import demote_store
            if not self.policies:
                raise ValueError("demote stores the evicted tokens of a policy: give policies")
            for spec in self.demote:
                demote_store(spec)
        if not self.budgets:
            raise ValueError("no budgets given")
        for r in self.regimes:
            if r not in WHEN:
                raise ValueError(f"unknown regime {r!r}; known: {WHEN}")
        for regime, names in self.regime_policies:
            if regime not in WHEN:
                raise ValueError(f"unknown regime {regime!r} in regime_policies; known: {WHEN}")
            for name in names:
                parse_policy(name)
        if self.decode_probe < 0:
            raise ValueError(f"decode_probe must be >= 0, got {self.decode_probe}")
        for field in ("chunk_size", "interval", "context_tokens", "continuation_tokens", "needle_per_kind",
                      "needle_tokens"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        for task in self.needle_tasks:
            if task not in needle.TASKS:
                raise ValueError(f"unknown needle task {task!r}; known: {sorted(needle.TASKS)}")

    def policies_for(self, regime: str) -> tuple[str, ...]:
        for r, names in self.regime_policies:
            if r == regime:
                return tuple(n for n in self.policies if n in names) + tuple(n for n in names if n not in self.policies)
        return self.policies


LOCRET = "locret"
COMBINE = "+"   # "snapkv+kivi4": a policy's kept tokens in a quantized cache
DEMOTE = "~"    # "snapkv~kivi2": a policy's evicted tokens kept in KIVI-2 (kvjax.quant.demote)
LOCRET_DEFAULTS = {"n_local": 32, "stab_frac": 0.25}  # as train/locret_eval (budget = k - n_local)


def is_locret(spec: str) -> bool:
    return spec.split(":")[0].strip().lower() == LOCRET


def parse_policy(spec: str) -> tuple[str, dict]:
    """'snapkv' or 'snapkv:window=32:kernel=7' -> (registry name, hyperparameter overrides).

    Values are Python literals (ints, floats, bools, strings). ValueError for unknown names.
    'locret[:n_local=32:stab_frac=0.25]' names Locret (trained heads, chunked prefill)."""
    name, kwargs = _split_spec(spec)
    if name.lower() == LOCRET:
        unknown = sorted(set(kwargs) - set(LOCRET_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown locret option(s) {unknown}; known: {sorted(LOCRET_DEFAULTS)}")
        return LOCRET, kwargs
    if name.lower().replace("-", "_") not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES) + [LOCRET]}")
    return name, kwargs


def _split_spec(spec: str) -> tuple[str, dict]:
    """'name:key=value:...' -> (name, {key: literal value})."""
    import ast
    name, *items = [p.strip() for p in spec.split(":")]
    if not name:
        raise ValueError(f"empty name in {spec!r}")
    kwargs = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"bad policy option {item!r} in {spec!r}: expected key=value")
        k, v = item.split("=", 1)
        v = v.strip()
        # lower-case booleans are common on a command line; as strings they would be truthy
        v = {"true": "True", "false": "False", "none": "None"}.get(v.lower(), v)
        try:
            kwargs[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kwargs[k.strip()] = v
    return name, kwargs


def build_policy(spec: str, params=None, config: Optional[ModelConfig] = None):
    """The policy object of a spec string (see `parse_policy`); params + config let RazorAttention
    find its retrieval heads and size AdaKV/PyramidKV caches for the model."""
    name, kwargs = parse_policy(spec)
    if name == LOCRET:
        raise ValueError("locret is not a scoring policy: it runs its own chunked prefill (see run_grid)")
    return make_policy(name, params=params, config=config, **kwargs)


def quant_cache_init(spec: str):
    """'kivi2' or 'kivi2:residual=64' -> `cache_init` from the kvjax.quant registry."""
    try:
        from kvjax.quant import make_cache_init
    except ImportError as err:  # the registry is optional
        raise ValueError(f"quantized caches are not available ({err})") from None
    name, kwargs = _split_spec(spec)
    return make_cache_init(name, **kwargs)


def locret_policy(spec: str, budget: Budget, context: int, chunk: int):
    """Locret at `budget` of `context` tokens: `k = budget.kept(context)` entries at the end of the
    prompt = top-(k - n_local) after every evicting chunk + the n_local tail (train/locret_eval;
    n_local defaults to min(32, k // 2)), n_stabilizers = stab_frac * (k - n_local)."""
    from kvjax.policies.locret import Locret
    _, given = parse_policy(spec)
    opts = {**LOCRET_DEFAULTS, **given}
    k = budget.kept(context)
    if "n_local" not in given:  # short prompts: the default tail takes at most half the budget
        opts["n_local"] = min(opts["n_local"], k // 2)
    b = k - int(opts["n_local"])
    if b <= 0:
        raise ValueError(f"locret: budget {budget} keeps {k} tokens, not more than n_local={opts['n_local']}")
    return Locret(budget=b, chunk=chunk, n_stabilizers=max(1, int(opts["stab_frac"] * b)),
                  n_local=int(opts["n_local"]))


def parse_budgets(spec: str) -> tuple[Budget, ...]:
    """'0.5,0.25,512' -> ratios (<= 1) and token counts (> 1); ValueError on <= 0 or junk."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(Budget.parse(item))
        except ValueError as err:
            raise ValueError(f"bad budget {item!r}: {err}") from None
    if not out:
        raise ValueError(f"no budgets in {spec!r}")
    return tuple(out)


@dataclasses.dataclass
class _Task:
    """Token arrays of one task: fidelity (context [1, T], targets [1, C]) or needle (prompts, answers)."""

    tokens: jax.Array
    targets: jax.Array
    mask: Optional[np.ndarray] = None
    kinds: tuple[str, ...] = ()


def _nan_row(**kw) -> dict:
    row = {c: math.nan for c in COLUMNS}
    row.update(notes="")
    row.update(kw)
    return row


@dataclasses.dataclass(frozen=True)
class _Method:
    """What one row runs: a Compression (None = full cache), Locret (spec, budget, heads) or a
    quantized cache (cache_init)."""

    comp: Optional[Compression] = None
    locret: Optional[tuple] = None
    cache_init: Optional[object] = None


def _run_task(params, config, task: _Task, method: _Method, ecfg: EvalConfig, runner, shared,
              stepwise: bool, mesh=None):
    comp, n_new = method.comp, task.targets.shape[1]
    on_mesh = {} if mesh is None else {"mesh": mesh}
    if method.locret is not None:
        spec, budget, heads = method.locret
        pol = locret_policy(spec, budget, task.tokens.shape[1], ecfg.chunk_size)
        pre = fidelity.prefill_locret(params, config, task.tokens, heads, pol, n_new, runner=runner)
    elif method.cache_init is not None and comp is not None:   # eviction x quantization
        chunk = ecfg.chunk_size if comp.when == "chunk" else None
        pre = fidelity.prefill_context(params, config, task.tokens, comp, n_new, chunk, runner=runner,
                                       kv_quant=method.cache_init, **on_mesh)
    elif method.cache_init is not None:
        pre = fidelity.prefill_quantized(params, config, task.tokens, method.cache_init, n_new, runner=runner,
                                         **on_mesh)
    else:
        chunk = ecfg.chunk_size if comp is not None and comp.when == "chunk" else None
        pre = fidelity.prefill_context(params, config, task.tokens, comp, n_new, chunk, runner=runner, **on_mesh)
    logits, secs, cache = fidelity.continuation_logits(params, config, pre, task.targets, stepwise=stepwise,
                                                       runner=runner)
    return pre, logits, secs, cache


def run_grid(params, config: ModelConfig, tokenizer, text: str, ecfg: EvalConfig,
             out_dir: Optional[str | pathlib.Path] = None, progress: bool = True, model_name: str = "",
             extra_meta: Optional[dict] = None, tokens: Optional[tuple[Sequence[int], Sequence[int]]] = None,
             mesh=None) -> list[dict]:
    """Evaluate every (regime, policy, budget) of `ecfg` plus the full cache; returns the rows
    (full cache first) and, with `out_dir`, writes results.csv, results.md and results.png.
    tokens: (context ids, continuation ids) to use instead of splitting `text`.
    mesh: a `jax.sharding.Mesh` ("data", "model"; `kvjax.sharding.make_mesh`): the parameters
    tensor-parallel over "model", every cache over batch ("data") and kv heads ("model"), as in
    `generate(mesh=)`. The fidelity task has batch 1 and the needle task one row per sample: the
    data axis must divide both (ValueError before anything runs); Locret rows are refused."""
    t_start = time.perf_counter()
    runner = fidelity.Runner()
    if tokens is not None:
        ctx, cont = list(tokens[0]), list(tokens[1])
    else:
        ctx, cont = fidelity.split_text(tokenizer, text, ecfg.context_tokens, ecfg.continuation_tokens)
    fid = _Task(jnp.asarray([ctx], jnp.int32), jnp.asarray([cont], jnp.int32))
    tasks = {"fidelity": fid}
    if ecfg.needle_tasks:
        samples = needle.make_samples(tokenizer, ecfg.needle_tasks, ecfg.needle_per_kind, ecfg.needle_tokens,
                                      ecfg.needle_depths, ecfg.seed, **(
                                          {"filler": ecfg.needle_filler} if ecfg.needle_filler else {}))
        prompts, answers, mask = needle.answer_batch(samples, ecfg.needle_query_aware)
        tasks["needle"] = _Task(jnp.asarray(prompts), jnp.asarray(answers), mask, tuple(s.kind for s in samples))

    specs = [("full", None, "-")]
    for regime in ecfg.regimes:
        for name in ecfg.policies_for(regime):
            if is_locret(name) and regime != "chunk":
                continue  # Locret is a chunked-prefill method
            for budget in ecfg.budgets:
                specs.append((name, budget, regime))
    if "chunk" not in ecfg.regimes:
        for name in ecfg.policies:
            if is_locret(name):
                specs += [(name, budget, "chunk") for budget in ecfg.budgets]
    specs += [(q, None, "quant") for q in ecfg.kv_quant]
    if ecfg.combine:   # eviction x quantization: the policy's kept tokens stored by the quantized cache
        specs += [(f"{name}{COMBINE}{q}", budget, regime) for regime in ecfg.regimes for q in ecfg.kv_quant
                  for name in ecfg.policies_for(regime) if not is_locret(name) for budget in ecfg.budgets]
    specs += [(f"{name}{DEMOTE}{d}", budget, "prefill") for d in ecfg.demote for name in ecfg.policies
              if not is_locret(name) for budget in ecfg.budgets]
    if mesh is not None:
        if any(is_locret(n) for n, _, _ in specs):
            raise ValueError("eval with a mesh does not run Locret rows (its own prefill loop runs on one device)")
        if ecfg.demote:
            raise ValueError("eval with a mesh does not run --demote rows (the demoted region is not sharded)")
        for task in tasks.values():
            sharding.plan(config, mesh, batch=task.tokens.shape[0])   # clear errors for axes that do not divide
        params = sharding.shard_params(params, config, mesh)
    heads = None
    if any(is_locret(n) for n, _, _ in specs):
        from kvjax.policies.locret import load_heads
        heads = load_heads(ecfg.locret_heads, config)
    built: dict = {}

    def method_of(name, budget, regime) -> _Method:
        if regime == "quant":
            return _Method(cache_init=quant_cache_init(name))
        if budget is None:
            return _Method()
        if DEMOTE in name:   # demotion runs after the prefill only (Compression refuses other regimes)
            policy, demote = name.split(DEMOTE, 1)
            m = method_of(policy, budget, regime)
            return dataclasses.replace(m, comp=dataclasses.replace(m.comp, demote=demote))
        if COMBINE in name:
            policy, quant = name.split(COMBINE, 1)
            return dataclasses.replace(method_of(policy, budget, regime), cache_init=quant_cache_init(quant))
        if is_locret(name):
            return _Method(locret=(name, budget, heads))
        if name not in built:  # RazorAttention's head search runs once per spec
            try:
                built[name] = build_policy(name, params, config)
            except Exception as err:
                built[name] = err
        if isinstance(built[name], Exception):
            raise built[name]
        return _Method(comp=Compression(built[name], budget, regime, ecfg.interval))
    # Compute order: rows that can share a prefill forward next to each other (grouped by what
    # their policy observes); chunked rows last. The table keeps the spec order.
    def order_key(i):
        name, budget, regime = specs[i]
        if regime in ("chunk", "quant"):
            return (2, regime, i)
        if name == "full":
            return (0, str(Observe()), i)
        try:
            obs = str(method_of(name, budget, regime).comp.observe)
        except Exception:  # reported when the row runs
            obs = "~"
        return (1, obs, i)

    order = sorted(range(len(specs)), key=order_key)
    rows: list[Optional[dict]] = [None] * len(specs)
    shared: dict = {}   # (unused: every row prefills with the engine; observations are policy-specific)
    full_logits: dict[str, jax.Array] = {}
    bar = order
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(order, desc="eval", unit="row")
    for i in bar:
        name, budget, regime = specs[i]
        if progress:
            bar.set_postfix_str(f"{name} {budget or ''} {regime}")
        try:
            with sharding.use(mesh):
                rows[i] = _evaluate_row(params, config, tasks, method_of(name, budget, regime), ecfg, runner,
                                        shared, full_logits, mesh)
        except Exception as err:  # keep the grid going, but say so loudly
            msg = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            warnings.warn(f"{name} {budget} {regime}: {msg}")
            rows[i] = _nan_row(notes=msg)
        rows[i].update(policy=name, budget=str(budget) if budget else "1", regime=regime)
    if out_dir is not None:
        meta = {"model": model_name or config.name, "backend": jax.default_backend(),
                "context_tokens": len(ctx), "continuation_tokens": len(cont),
                "needle": (f"{ecfg.needle_per_kind} x {'+'.join(ecfg.needle_tasks)} at {ecfg.needle_tokens} tokens, "
                           f"depths {ecfg.needle_depths[0]}-{ecfg.needle_depths[1]}, "
                           + ("query-aware (question in the compressed prompt)" if ecfg.needle_query_aware else
                              "question-agnostic (haystack compressed, then question + answer fed)")
                           + (f", filler: {len(ecfg.needle_filler)} sentences of the evaluated text"
                              if ecfg.needle_filler else ", filler: synthetic (the passkey paper's sentences)"))
                if ecfg.needle_tasks else "none",
                "chunk_size": ecfg.chunk_size, "interval": ecfg.interval, "seed": ecfg.seed,
                "continuation": ("token by token (decode steps)" if ecfg.stepwise else
                                 f"one forward (decode regime: decode steps); decode ms/tok timed over "
                                 f"{ecfg.decode_probe} decode steps"),
                "wall_s": time.perf_counter() - t_start, "compile_s": runner.compile_s,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        if mesh is not None:
            meta["mesh"] = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
        meta.update(extra_meta or {})
        write_results(rows, out_dir, meta)
    return rows


def _evaluate_row(params, config, tasks: dict, method: _Method, ecfg: EvalConfig, runner,
                  shared: dict, full_logits: dict, mesh=None) -> dict:
    row = _nan_row()
    notes = []
    comp = method.comp
    if comp is not None and comp.when == "decode":
        from kvjax.compression import init_query_buffer
        buf = init_query_buffer(comp, config, 1)
        if buf is not None:
            notes.append(f"+{buf.memory_bytes() / 2 ** 20:.2f} MiB decode query buffer")
    plain = method.locret is None and method.cache_init is None
    for key, task in tasks.items():
        stepwise = ecfg.stepwise if key == "fidelity" else False
        pre, logits, secs, cache = _run_task(params, config, task, method, ecfg, runner, shared.get(key), stepwise,
                                             mesh)
        notes += [f"{key}: {n}" for n in pre.notes]
        if comp is None and plain:
            full_logits[key] = logits
        if key == "fidelity":
            m = fidelity.fidelity_metrics(full_logits["fidelity"], logits, task.targets)
            c = task.targets.shape[1]
            if (stepwise or (pre.compression is not None and pre.compression.when == "decode")) and c > 1:
                decode_ms = 1000 * secs / (c - 1)
            elif ecfg.decode_probe and c > 1:
                decode_ms = 1000 * fidelity.decode_seconds_per_token(params, config, pre, task.targets[:, :-1],
                                                                     ecfg.decode_probe, runner)
            else:
                decode_ms = math.nan
            row.update(kl=m["kl"], kl_max=m["kl_max"], ppl=m["ppl"],
                       kept=pre.plan.max_keep if pre.plan.max_keep else pre.context_len,
                       cache_bytes=cache.memory_bytes(), peak_cache_bytes=max(pre.peak_bytes, cache.memory_bytes()),
                       prefill_s=pre.seconds, decode_ms_per_tok=decode_ms)
        else:
            s = needle.score_answers(logits, task.targets, task.mask)
            kinds = np.asarray(task.kinds)
            row.update(needle_logprob=float(s["logprob"].mean()), needle_acc=float(s["acc"].mean()),
                       needle_exact=float(s["exact"].mean()), needle_prefill_s=pre.seconds)
            for kind in ("passkey", "kv"):
                if np.any(kinds == kind):
                    row[f"{kind}_logprob"] = float(s["logprob"][kinds == kind].mean())
                    row[f"{kind}_exact"] = float(s["exact"][kinds == kind].mean())
    row["notes"] = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------------------------
# Output

def _fmt(value, digits=3) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[dict]) -> str:
    head = ["policy", "budget", "regime", "kept", "KL (nats/tok)", "ppl", "needle logprob", "needle acc",
            "needle exact", "cache MiB", "peak MiB", "prefill s", "decode ms/tok", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mib = lambda b: "-" if isinstance(b, float) and math.isnan(b) else f"{b / 2 ** 20:.2f}"
        cells = [r["policy"], r["budget"], r["regime"], _fmt(r["kept"]), _fmt(r["kl"], 4), _fmt(r["ppl"], 3),
                 _fmt(r["needle_logprob"], 2), _fmt(r["needle_acc"], 2), _fmt(r["needle_exact"], 2),
                 mib(r["cache_bytes"]), mib(r["peak_cache_bytes"]), _fmt(r["prefill_s"], 2),
                 _fmt(r["decode_ms_per_tok"], 1), str(r["notes"]).replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: Sequence[dict], out_dir, meta: dict) -> dict:
    """results.csv (every column), results.md (table + setup), results.png (quality vs budget)."""
    from kvjax.eval.plot import plot_quality
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    setup = "\n".join(f"- {k}: {_fmt(v, 1) if isinstance(v, float) else v}" for k, v in meta.items())
    md = (f"# kvjax evaluation\n\n{setup}\n\n"
          "KL = mean KL(full || compressed) of the next-token distributions over the teacher-forced "
          "continuation; ppl = perplexity of that continuation; needle logprob = mean summed log-prob of "
          "the answer tokens (nats), acc = teacher-forced token accuracy, exact = greedy exact match; "
          "kept = tokens per head kept of the context; cache = bytes allocated during the continuation, "
          "peak = largest cache allocated (prefill included); times exclude compilation and are single "
          "measurements (noisy on a shared CPU; rows sharing a prefill forward report its time). "
          "Regimes: prefill = compress once after the context, chunk = after every prefill chunk, "
          "decode = after prefill and every `interval` decode steps. results.csv also has per-task needle "
          "columns (passkey_*, kv_*) and the max per-token KL.\n\n"
          + markdown_table(rows) + "\n\n![quality vs budget](results.png)\n")
    (out / "results.md").write_text(md)
    plot_quality(rows, out / "results.png", title=f"{meta.get('model', '')}: quality vs kept fraction")
    return {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png"}
