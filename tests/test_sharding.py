"""kvjax.sharding on 8 CPU devices: one subprocess (XLA_FLAGS set before jax starts) runs
tests/sharding_checks.py, which compares every sharded run with the same call on one device;
here we assert on what it measured."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_checks.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["devices"] == 8
    assert not data.get("failures"), "\n".join(data["failures"])
    return data


@pytest.mark.parametrize("mesh,shard", [("8x1", [1, 8]), ("2x4", [4, 2]), ("1x8", [8, 1])])
def test_dense_generate_equals_one_device(checks, mesh, shard):
    r = checks[f"dense_{mesh}"]
    assert r["tokens_equal"] and r["cache_ints_equal"]
    assert r["logits_rel_err"] < 1e-5
    # really sharded: batch over data, kv heads over model; each device holds 1/8 of the cache
    assert r["key_shard_shape"][:2] == shard and r["key_shard_shape"][2:] == r["key_shape"][2:]
    assert r["cache_bytes_per_device"] * 8 == r["cache_bytes"]
    assert r["wq_shard_shape"] == [64, 512 // int(mesh.split("x")[1])]
    assert r["wo_spec"] == "P('model', None)"


@pytest.mark.parametrize("name", ["kivi4", "snapkv50", "adakv50"])
def test_caches_and_policies_equal_one_device(checks, name):
    r = checks[name]
    assert r["tokens_equal"] and r["cache_ints_equal"]      # same kept slots / positions / lengths
    if name == "adakv50":   # head-packed pool: batch over data only
        assert r["cache_type"] == "PackedCache" and r["first_leaf_spec"] == "P(None, 'data')"
        assert r["cache_bytes_per_device"] * 2 == r["cache_bytes"]
    else:
        assert r["first_leaf_spec"] == "P('data', 'model')"
        assert r["cache_bytes_per_device"] * 8 == r["cache_bytes"]


# tolerances as test_kernels_dispatch's one-device kernel-vs-XLA comparison (KIVI: the kernel
# dequantizes in another order)
@pytest.mark.parametrize("name,tol", [("dense", 1e-4), ("kivi4", 2e-2)])
def test_kernels_run_under_shard_map_and_equal_one_device(checks, name, tol):
    r = checks[f"{name}_interpret_step"]
    assert r["shard_map"] and r["pallas_call"]
    assert r["logits_rel_err"] < tol and r["same_next_token"]


def test_training_step_equals_one_device(checks):
    t = checks["train"]
    assert abs(t["loss_sharded"] - t["loss"]) <= 1e-5 * abs(t["loss"])
    assert t["grad_rel_err"] < 1e-5 and t["heads_rel_err_2_steps"] < 1e-5
    assert t["wq_spec"] == "P(None, None, 'model')" and t["batch_spec"] == "P('data',)"


def test_checkpoint_restores_on_other_mesh(checks):
    c = checks["checkpoint"]
    assert c["equal"] and c["saved_mesh"] == {"data": 2, "model": 4} and c["restored_mesh"] == {"data": 8, "model": 1}


def test_errors_and_replication_notes(checks):
    e = checks["errors"]
    assert "needs 16 devices, but only 8" in e["too_many_devices"]
    assert "pipe=4" in e["bad_spec"]
    assert "batch 6 is not divisible" in e["batch"] and "batch 3 is not divisible" in e["generate_batch"]
    assert "12 attention heads are not divisible" in e["heads"]
    kv = e["kv_replicated"]
    assert "replicated over 'model'" in kv["notes"][0]
    assert kv["cache_spec"] == "P('data',)" and kv["wk_spec"] == "P(None, None)"


def test_eval_on_mesh_equals_one_device(checks):
    rows = checks["eval"]
    assert [r["policy"] for r in rows] == ["full", "snapkv:window=4:kernel=3"]
    for r in rows:
        (kl, kl_m), (ppl, ppl_m), (cb, cb_m) = r["kl"], r["ppl"], r["cache_bytes"]
        assert not r["notes"][1].startswith("error"), r["notes"]
        assert abs(ppl_m - ppl) <= 1e-5 * ppl and cb_m == cb
        assert abs(kl_m - kl) <= 1e-5 * max(kl, 1e-3)
    assert rows[1]["kl"][0] > 1e-4        # the SnapKV row really differs from the full cache
    assert "batch 1 is not divisible by the mesh's data axis (2)" in checks["eval_data2"]


def test_nnx_logical_axes(checks):
    assert checks["nnx"]["same_specs"] and checks["nnx"]["w_gate_spec"] == "P(None, 'model')"


def test_parse_mesh_errors():
    from kvjax.sharding import parse_mesh
    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("model=2") == {"data": 1, "model": 2}
    for bad in ("data=0", "data=x", "data=2,data=2", "", "data2"):
        with pytest.raises(ValueError):
            parse_mesh(bad)
