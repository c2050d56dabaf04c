"""kvjax.eval: KL / perplexity vs float64 numpy, the full cache against the float64 numpy forward,
needle tasks (deterministic, answer where stated, exact == greedy decoding), the harness end to end
on a tiny random model, and the CLI's input errors."""
import csv
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.compression import Compression
from kvjax.eval import fidelity, needle
from kvjax.eval.harness import COLUMNS, EvalConfig, parse_budgets, run_grid
from kvjax.generate import generate
from kvjax.policies import make_policy
from kvjax.policies.base import Budget
from models.config import ModelConfig
from models.llama import init_params
from numpy_reference import reference_logits

CFG = ModelConfig(name="tiny-eval", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, ffn_dim=48, rope_theta=10000.0)


class AsciiTokenizer:
    """One token per ASCII character (ids < 128 = CFG.vocab_size)."""

    def encode(self, text):
        ids = [ord(c) for c in text]
        assert max(ids) < 128
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(3), scale=0.3, stacked=True)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _ids(n, seed):
    return np.random.RandomState(seed).randint(32, 127, size=n).tolist()


# ------------------------------------------------------------------------------------------------
# metrics

def test_kl_and_perplexity_match_float64_numpy():
    rng = np.random.RandomState(0)
    p = rng.normal(size=(3, 7, 50)) * 3
    q = p + rng.normal(size=p.shape)
    targets = rng.randint(0, 50, size=(3, 7))
    lp, lq = _np_log_softmax(p), _np_log_softmax(q)
    kl_ref = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(np.asarray(fidelity.kl_per_token(p.astype(np.float32), q.astype(np.float32))),
                               kl_ref, rtol=1e-4, atol=1e-6)
    nll = -np.take_along_axis(lq, targets[..., None], -1)[..., 0]
    assert fidelity.perplexity(q.astype(np.float32), targets) == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    mask = rng.rand(3, 7) > 0.3
    assert fidelity.perplexity(q.astype(np.float32), targets, mask) == pytest.approx(np.exp(nll[mask].mean()), rel=1e-5)
    assert float(jnp.max(fidelity.kl_per_token(p, p))) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity.kl_per_token(p, q[:, :3])


def test_full_cache_continuation_matches_numpy_forward_and_kl_is_zero(params):
    ctx, cont = _ids(40, 1), _ids(9, 2)
    ref = reference_logits(jax.tree_util.tree_map(np.asarray, params), CFG, np.asarray(ctx + cont))
    ref = ref[len(ctx) - 1: len(ctx) + len(cont) - 1]  # the rows that predict the continuation
    for stepwise in (False, True):
        pre = fidelity.prefill_context(params, CFG, [ctx], None, len(cont))
        logp, _, _ = fidelity.continuation_logits(params, CFG, pre, [cont], stepwise=stepwise)
        np.testing.assert_allclose(np.asarray(logp[0]), _np_log_softmax(ref), atol=2e-4)
    lr = _np_log_softmax(ref)
    ppl_ref = np.exp(-lr[np.arange(len(cont)), cont].mean())
    out = fidelity.evaluate_fidelity(params, CFG, ctx, cont, None)
    assert out["kl"] == 0.0 and out["kl_max"] == 0.0
    assert out["ppl"] == pytest.approx(ppl_ref, rel=1e-4) and out["ppl_full"] == out["ppl"]


def test_compressed_fidelity_stepwise_equals_one_forward_and_memory_shrinks(params):
    ctx, cont = _ids(48, 4), _ids(8, 5)
    run = fidelity.Runner()
    full = fidelity.evaluate_fidelity(params, CFG, ctx, cont, None, runner=run)
    comp = Compression(make_policy("snapkv", window=4), Budget(ratio=0.25))
    a = fidelity.evaluate_fidelity(params, CFG, ctx, cont, comp, stepwise=False, runner=run)
    b = fidelity.evaluate_fidelity(params, CFG, ctx, cont, comp, stepwise=True, runner=run)
    assert a["kl"] > 1e-6 and a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-7)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-4)
    heads = CFG.n_layers * CFG.n_kv_heads  # batch 1
    cache_bytes = lambda slots: heads * slots * (2 * CFG.head_dim * 4 + 4) + heads * 4  # k, v, positions; lengths
    assert full["cache_bytes"] == cache_bytes(48 + 8)
    assert a["cache_bytes"] == cache_bytes(12 + 8)  # budget + continuation room
    # a budget that keeps the whole context is a no-op, with a note
    noop = fidelity.evaluate_fidelity(params, CFG, ctx, cont, Compression(make_policy("knorm"), Budget(tokens=100)),
                                      runner=run)
    assert noop["kl"] == 0.0 and "no compression" in noop["notes"][0]


def test_decode_regime_compresses_inside_the_continuation(params):
    ctx, cont = _ids(32, 6), _ids(24, 7)
    comp = Compression(make_policy("knorm"), Budget(tokens=8), when="decode", interval=4)
    pre = fidelity.prefill_context(params, CFG, [ctx], comp, len(cont))
    assert pre.cache.capacity == 8 + 4
    logits, _, cache = fidelity.continuation_logits(params, CFG, pre, [cont], stepwise=False)
    assert logits.shape == (1, 24, CFG.vocab_size) and cache.capacity == 12
    assert int(jnp.max(cache.lengths)) <= 12 and np.isfinite(np.asarray(logits)).all()
    assert fidelity.decode_seconds_per_token(params, CFG, pre, [cont], 5) > 0


# ------------------------------------------------------------------------------------------------
# needle tasks

@pytest.mark.parametrize("kind", ["passkey", "kv"])
def test_needle_samples_deterministic_and_answer_where_stated(kind, smollm2_tokenizer):
    tok = smollm2_tokenizer
    make = needle.TASKS[kind]
    a, b, c = make(tok, n_tokens=600, depth=0.7, seed=5), make(tok, n_tokens=600, depth=0.7, seed=5), \
        make(tok, n_tokens=600, depth=0.7, seed=6)
    assert a == b and a.prompt != c.prompt
    assert len(a.prompt) == 600
    s, e = a.needle
    needle_text = tok.decode(list(a.prompt[s:e]))
    key_text = tok.decode(list(a.prompt[-12:]))
    if kind == "passkey":
        assert needle_text.count(a.answer_text) == 2 and a.answer_text not in tok.decode(list(a.prompt[:s]))
    else:
        assert needle_text.strip().endswith(f"is {a.answer_text}.")
        key = needle_text.split("key ")[1].split(" ")[0]
        text = tok.decode(list(a.prompt))
        assert key in key_text and text.count(f"key {key} is") == 2  # the pair and the question
        assert text.count(f"key {key} is {a.answer_text}.") == 1 and text.count(" The value of key ") == 3 + 1 + 1  # distractors, pair, question
    assert abs(a.depth - 0.7) < 12 / 600 and a.depth == s / 600
    # the answer tokens continue the prompt exactly as a joint tokenization would
    assert tok.decode(list(a.answer)).strip() == a.answer_text
    full = tok.decode(list(a.prompt + a.answer))
    assert tok.encode(full)[-len(a.answer):] == list(a.answer)


def test_needle_batch_and_errors():
    tok = AsciiTokenizer()
    samples = needle.make_samples(tok, ("passkey", "kv"), n_per_kind=2, n_tokens=400, seed=1)
    assert [s.kind for s in samples] == ["passkey", "passkey", "kv", "kv"]
    assert needle.make_samples(tok, ("passkey", "kv"), 2, 400, seed=1) == samples
    assert round(samples[0].depth, 1) == 0.5 and 0.75 < samples[1].depth <= 0.9  # 0.9 is in the question here
    prompts, answers, mask = needle.answer_batch(samples)
    assert prompts.shape == (4, 400) and mask.sum(1).tolist() == [len(s.answer) for s in samples]
    # question-agnostic: the haystack is compressed, then the (longest) question + answer are fed
    ctx, targets, mask = needle.answer_batch(samples, query_aware=False)
    q = max(400 - s.question for s in samples)
    assert q == max(s.question_len for s in samples) and ctx.shape == (4, 400 - q)
    for i, s in enumerate(samples):
        assert tok.decode(s.prompt[s.question:]).startswith("\nWhat is the")
        assert list(ctx[i]) + list(targets[i, :q]) == list(s.prompt)
        assert list(targets[i, mask[i]]) == list(s.answer) and not mask[i, :q].any()
    with pytest.raises(ValueError, match="too short"):
        needle.passkey_sample(tok, n_tokens=50)
    with pytest.raises(ValueError, match="depth"):
        needle.kv_sample(tok, depth=1.5)
    with pytest.raises(ValueError, match="unknown needle task"):
        needle.make_samples(tok, ("haystack",))


def test_score_answers_matches_numpy():
    rng = np.random.RandomState(2)
    logits = rng.normal(size=(3, 4, 20)).astype(np.float32)
    answers = rng.randint(0, 20, size=(3, 4))
    answers[0] = logits[0].argmax(-1)          # all right
    answers[1, :2] = logits[1, :2].argmax(-1)  # 2 of 3 live tokens right at most
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], bool)
    s = needle.score_answers(logits, answers, mask)
    lp = _np_log_softmax(logits)
    tok = np.take_along_axis(lp, answers[..., None], -1)[..., 0]
    np.testing.assert_allclose(s["logprob"], (tok * mask).sum(1), rtol=1e-5)
    hit = logits.argmax(-1) == answers
    np.testing.assert_allclose(s["acc"], (hit & mask).sum(1) / mask.sum(1))
    np.testing.assert_array_equal(s["exact"], [1.0, float(hit[1, :3].all()), float(hit[2, 0])])


@pytest.mark.parametrize("policy", [None, "snapkv"])
def test_exact_match_equals_greedy_decoding(params, policy):
    """Teacher-forced exact match on the greedy output is 1, and 0 once its last token changes."""
    prompt = _ids(40, 8)
    comp = None if policy is None else Compression(make_policy(policy, window=4), Budget(ratio=0.5))
    greedy = generate(params, CFG, [prompt], 6, bucket=1, eos_ids=(), compression=comp).tokens[0]
    pre = fidelity.prefill_context(params, CFG, [prompt], comp, 6)
    logits, _, _ = fidelity.continuation_logits(params, CFG, pre, [greedy], stepwise=False)
    right = needle.score_answers(logits, np.asarray([greedy]), np.ones((1, 6), bool))
    assert right["exact"][0] == 1.0 and right["acc"][0] == 1.0
    wrong = list(greedy[:-1]) + [(greedy[-1] + 1) % CFG.vocab_size]
    logits, _, _ = fidelity.continuation_logits(params, CFG, pre, [wrong], stepwise=False)
    s = needle.score_answers(logits, np.asarray([wrong]), np.ones((1, 6), bool))
    assert s["exact"][0] == 0.0 and s["acc"][0] == pytest.approx(5 / 6)


# ------------------------------------------------------------------------------------------------
# harness and CLI

def test_harness_tiny_model_writes_files(params, tmp_path):
    text = " ".join(["In the beginning God created the heaven and the earth."] * 20)
    ecfg = EvalConfig(policies=("snapkv:window=8", "h2o"), budgets=parse_budgets("12"),
                      regimes=("prefill", "chunk", "decode"),
                      regime_policies=(("chunk", ("h2o",)), ("decode", ("h2o",))),
                      chunk_size=16, interval=8, context_tokens=64, continuation_tokens=12,
                      needle_per_kind=1, needle_tokens=300, stepwise=False, decode_probe=0)
    rows = run_grid(params, CFG, AsciiTokenizer(), text, ecfg, out_dir=tmp_path, progress=False)
    assert [(r["policy"], r["regime"]) for r in rows] == [
        ("full", "-"), ("snapkv:window=8", "prefill"), ("h2o", "prefill"), ("h2o", "chunk"), ("h2o", "decode")]
    assert rows[0]["kl"] == 0.0 and rows[0]["kept"] == 64
    for r in rows[1:]:
        assert not r["notes"].startswith("error"), r
        assert r["kl"] > 0 and r["cache_bytes"] < rows[0]["cache_bytes"] and r["kept"] == 12
        assert np.isfinite([r["ppl"], r["needle_logprob"], r["needle_acc"], r["prefill_s"]]).all()
    assert rows[3]["peak_cache_bytes"] < rows[0]["peak_cache_bytes"]          # chunked: peak = budget + chunk
    assert rows[4]["cache_bytes"] < rows[2]["cache_bytes"] and rows[4]["decode_ms_per_tok"] > 0  # decode: stepwise
    assert math.isnan(rows[2]["decode_ms_per_tok"])  # no probe asked
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["policy"] for r in table][:2] == ["full", "snapkv:window=8"] and list(table[0]) == list(COLUMNS)
    md = (tmp_path / "results.md").read_text()
    assert "| full | 1 | - |" in md and "| h2o | 12tok | decode |" in md and "| h2o | 12tok | chunk |" in md
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_bad_inputs_raise_clear_errors(capsys):
    with pytest.raises(ValueError, match="positive"):
        parse_budgets("0.5,0")
    with pytest.raises(ValueError, match="positive"):
        parse_budgets("-3")
    with pytest.raises(ValueError, match="unknown policy"):
        EvalConfig(policies=("snapkv", "nope"))
    with pytest.raises(ValueError, match="key=value"):
        EvalConfig(policies=("snapkv:window",))
    with pytest.raises(ValueError, match="unknown regime"):
        EvalConfig(regimes=("prefill", "later"))
    from kvjax.cli import main
    assert main(["eval", "--policy", "nope", "--out", ""]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["eval", "--budget", "0", "--out", ""]) == 2
    assert "budget" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--heads"):
        EvalConfig(policies=("snapkv", "locret"))
    with pytest.raises(ValueError, match="unknown locret option"):
        EvalConfig(policies=("locret:budget=3",), locret_heads="x")
    assert main(["generate", "--prompt", "x", "--policy", "locret", "--budget", "0.5"]) == 2
    assert "--heads PATH" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--kv-quant", "kivi9"]) == 2
    assert "unknown quantized cache" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--policy", "knorm", "--budget", "0.5", "--kv-quant", "mikv"]) == 2
    assert "eviction x mikv is not supported" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--quantized-prefill"]) == 2
    assert "--quantized-prefill applies to --kv-quant" in capsys.readouterr().err
    with pytest.raises(ValueError, match="need"):
        fidelity.split_text(AsciiTokenizer(), "short text", 100, 10)


def test_policy_all_builds_every_registered_policy():
    from kvjax.cli import expand_policies
    from kvjax.policies import POLICIES
    notes = []
    got = expand_policies("all", notes=notes)
    assert set(got) == set(POLICIES) - {"duo_attention"} and "razor" in got and "locret" not in got
    assert any("duo_attention" in n and "pattern_file" in n for n in notes) and any("--heads" in n for n in notes)
    notes = []
    got = expand_policies("all,duo_attention:pattern_file=p.json", heads="h", notes=notes)
    assert "duo_attention:pattern_file=p.json" in got and "locret" in got and len(got) == len(POLICIES) + 1
    assert notes == []


def test_harness_razor_locret_and_quantized_rows(params, tmp_path):
    from kvjax.policies.locret import HeadSpec, init_heads, save_heads
    spec = HeadSpec.for_model(CFG)
    save_heads(tmp_path / "heads", init_heads(spec, jax.random.PRNGKey(0)), spec)
    text = " ".join(["In the beginning God created the heaven and the earth."] * 20)
    ecfg = EvalConfig(policies=("razor", "locret:n_local=4"), budgets=parse_budgets("0.5"), regimes=("prefill",),
                      chunk_size=16, context_tokens=64, continuation_tokens=12, needle_tasks=(), decode_probe=0,
                      locret_heads=str(tmp_path / "heads"),
                      kv_quant=("kivi4:group=8:residual=8", "kivi2:group=8:residual=8"))
    rows = run_grid(params, CFG, AsciiTokenizer(), text, ecfg, out_dir=tmp_path, progress=False)
    assert [(r["policy"], r["regime"]) for r in rows] == [
        ("full", "-"), ("razor", "prefill"), ("locret:n_local=4", "chunk"),
        ("kivi4:group=8:residual=8", "quant"), ("kivi2:group=8:residual=8", "quant")]
    full, razor, locret, q4, q2 = rows
    for r in rows[1:]:
        assert not r["notes"].startswith("error"), r
        assert np.isfinite([r["kl"], r["ppl"]]).all() and r["cache_bytes"] < full["cache_bytes"]
    assert razor["kl"] >= 0
    # Locret keeps 28 chunk-evicted + 4 local = 32 entries; the chunk loop never holds the whole context
    assert locret["kept"] == 32 and locret["kl"] > 0 and locret["peak_cache_bytes"] < full["peak_cache_bytes"]
    # quantized rows keep every token; 4 bits are closer to the full cache than 2 bits
    assert q4["kept"] == q2["kept"] == 64 and 0 < q4["kl"] < q2["kl"]
    assert q2["cache_bytes"] < q4["cache_bytes"]
    assert "| kivi2:group=8:residual=8 | 1 | quant |" in (tmp_path / "results.md").read_text()


def test_policy_spec_values_are_typed():
    """Command-line option values become Python values: lower-case booleans are booleans (as the
    string "false" they would be silently truthy), numbers are numbers, other words stay strings."""
    from kvjax.eval.harness import parse_policy
    name, kw = parse_policy("snapkv:window=32:pool=max:flag=false:other=True:eps=1e-3:x=none")
    assert name == "snapkv"
    assert kw == {"window": 32, "pool": "max", "flag": False, "other": True, "eps": 1e-3, "x": None}
    assert kw["flag"] is False
