"""The Ray executor: byte-identical to the local executor, and a worker killed mid-step is retried or
fails the step with the previous checkpoint intact.

One local Ray instance with 2 CPUs serves the whole module (starting one takes seconds); the tests
that need it skip when Ray is not installed. The kill tests use the executor's test-only hook
``OPCM_RAY_FAULT=PASS:UNIT:FLAG_FILE``: the task that processed that unit SIGKILLs its own worker
process while the flag file exists (it deletes the file first, so a retry runs through).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import (build_model, make_family, run_cli, snapshot, temporaries, tiny_clip_vision_config,
                     tiny_llama_config)

import opcm_ext
from opcm_ext.errors import BackendError, CheckpointError, ConfigError
from opcm_ext.executors.ray import RayExecutor, init_ray, _chunks, _parse_fault, _replay, _taped
from opcm_ext.methods.base import ScanSums
from opcm_ext.plan import Group, Kind, Streamed

METHODS = {"opcm": {"alpha": 0.5}, "task_arithmetic": {"lam": 0.3}, "ties": {"lam": 0.5, "keep": 0.2}, "average": {}}


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and 3 fine-tunes of a tiny CLIP vision model, one file each."""
    paths, _ = make_family(tmp_path_factory.mktemp("ray"), tiny_clip_vision_config(), "CLIPVisionModel", 3)
    return paths


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Wider (48) and sharded in two files: small budgets put tensors in row blocks and stream SVDs."""
    cfg = tiny_clip_vision_config(hidden=48, layers=2, inter=96)
    paths, _ = make_family(tmp_path_factory.mktemp("ray-sharded"), cfg, "CLIPVisionModel", 3, seed=5,
                           max_shard_size="100KB")
    return paths


def _merge_both(paths, tmp_path, method, **options):
    """The same sequence with the local and the Ray executor; returns both outputs and the Ray reports."""
    local, remote = tmp_path / "local", tmp_path / "ray"
    opcm_ext.merge_sequence(paths[0], paths[1:], local, method=method, device="cpu", **METHODS[method], **options)
    reports = opcm_ext.merge_sequence(paths[0], paths[1:], remote, method=method, device="cpu", executor="ray",
                                      **METHODS[method], **options)
    return local, remote, reports


# -- the driver's bookkeeping, without Ray ------------------------------------------------------------


def test_replayed_tapes_add_in_the_local_order():
    """float64 addition is not associative: only replaying each addend in order gives the local sum."""
    addends = [torch.tensor(x, dtype=torch.float64) for x in (1e16, 1.0, 1.0, -1e16, 3.0, 1e-3)]
    local = ScanSums()
    for a in addends:  # the local executor: one running sum
        local.tau_sq = local.tau_sq + a
    total = ScanSums()
    for part in (addends[:2], addends[2:5], addends[5:]):  # three tasks, replayed in unit order
        task = _taped(ScanSums(), torch.device("cpu"))
        for a in part:
            task.tau_sq = task.tau_sq + a
        task.m_sq += 2.0
        _replay(total, task)
    assert total.tau_sq.item() == local.tau_sq.item()
    assert total.m_sq.item() == 6.0
    naive = ScanSums()
    for part in (addends[:2], addends[2:5], addends[5:]):  # merging per-task partial sums would differ
        naive.tau_sq = naive.tau_sq + sum(part, torch.zeros((), dtype=torch.float64))
    assert naive.tau_sq.item() != local.tau_sq.item()


def test_chunks_are_consecutive_runs_and_a_streamed_matrix_runs_alone():
    g = [Group(Kind.AVERAGED, (f"k{i}",), cost=10, input_bytes=10 + i) for i in range(9)]
    s = Streamed("big", (64, 32), block=16, cost=100)
    units = g[:4] + [s] + g[4:]
    chunks = _chunks(units, slots=2)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(units)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # consecutive, nothing skipped
    assert (4, 5) in chunks and len(chunks) > 3


def test_bad_fault_spec_and_retries_are_config_errors(monkeypatch):
    monkeypatch.setenv("OPCM_RAY_MAX_RETRIES", "many")
    with pytest.raises(ConfigError, match="OPCM_RAY_MAX_RETRIES"):
        RayExecutor()
    monkeypatch.setenv("OPCM_RAY_MAX_RETRIES", "0")
    assert RayExecutor().max_retries == 0
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert RayExecutor().address == "10.0.0.1:6379" and RayExecutor("127.0.0.1:1").address == "127.0.0.1:1"
    assert _parse_fault("write:3:/tmp/flag") == ("write", 3, "/tmp/flag") and _parse_fault("") is None
    with pytest.raises(ConfigError, match="OPCM_RAY_FAULT"):
        _parse_fault("write")


def test_a_typed_error_in_a_task_reaches_the_driver_with_its_type(ray_instance):
    def fails():  # defined here: Ray ships it by value (workers cannot import test modules)
        raise CheckpointError("model.safetensors is truncated")

    ref = ray_instance.remote(fails).options(max_retries=0).remote()
    with pytest.raises(CheckpointError, match="truncated"):
        RayExecutor()._result(ray_instance, ref, "sigma", [], 0)


# -- byte identity with the local executor --------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ray_output_is_byte_identical_to_local(ray_instance, family, tmp_path, method):
    local, remote, reports = _merge_both(family, tmp_path, method)
    assert snapshot(remote) == snapshot(local)  # every file: tensors, headers with the state, config
    assert all("ray_tasks" in r.timings for r in reports)  # the passes really ran as Ray tasks
    assert temporaries(remote) == []


@pytest.mark.parametrize("method,budget", [("opcm", "300KB"), ("ties", "120KB")])
def test_row_blocks_streamed_svds_and_shards_are_byte_identical(ray_instance, sharded, tmp_path, method, budget):
    local, remote, reports = _merge_both(sharded, tmp_path, method, memory_budget=budget)
    assert snapshot(remote) == snapshot(local)
    assert (remote / "model.safetensors.index.json").is_file()
    if method == "opcm":
        assert reports[-1].streamed > 0  # some SVDs ran block by block inside a task
    else:
        whole = opcm_ext.merge_stream(sharded[0], None, sharded[1], tmp_path / "whole", method=method, device="cpu")
        assert reports[0].groups > 2 * whole.groups  # the budget split tensors into row blocks


def test_lora_adapters_as_models_are_byte_identical(ray_instance, tmp_path):
    """An adapter read as a model travels to the workers too (it reopens itself and its base by path)."""
    peft = pytest.importorskip("peft")
    base = build_model(tiny_llama_config(), "LlamaForCausalLM", 0)
    base.save_pretrained(tmp_path / "base")
    paths = [tmp_path / "base"]
    for i in range(2):
        torch.manual_seed(10 + i)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(base), lora).save_pretrained(tmp_path / f"adapter{i}")
        paths.append(tmp_path / f"adapter{i}")
    local, remote, _ = _merge_both(paths, tmp_path, "opcm")
    assert snapshot(remote) == snapshot(local)


# -- a worker killed mid-step ------------------------------------------------------------------------------


@pytest.fixture()
def two_steps(ray_instance, family, tmp_path):
    """An OPCM merge at step 2 (through Ray), and the uninterrupted step 3 written with the local executor."""
    want = tmp_path / "want"
    opcm_ext.merge_sequence(family[0], family[1:], want, device="cpu")
    out = tmp_path / "out"
    opcm_ext.merge_sequence(family[0], family[1:3], out, device="cpu", executor="ray")
    return out, snapshot(want)


@pytest.mark.parametrize("pass_name,unit", [("sigma", 1), ("write", 0)])
def test_a_killed_worker_is_retried_and_the_step_equals_an_uninterrupted_run(two_steps, family, tmp_path,
                                                                              monkeypatch, pass_name, unit):
    out, want = two_steps
    flag = tmp_path / "kill-once"
    flag.write_text("")
    monkeypatch.setenv("OPCM_RAY_FAULT", f"{pass_name}:{unit}:{flag}")
    opcm_ext.merge_stream(family[0], out, family[3], device="cpu", executor="ray")
    assert not flag.exists()  # the worker was killed once (the task consumed the flag), then retried
    assert snapshot(out) == want
    assert temporaries(out) == []


def test_a_killed_worker_without_retries_fails_the_step_and_leaves_the_checkpoint(two_steps, family, tmp_path,
                                                                                  monkeypatch):
    out, want = two_steps
    before = snapshot(out)
    flag = tmp_path / "kill-once"
    flag.write_text("")
    monkeypatch.setenv("OPCM_RAY_MAX_RETRIES", "0")
    monkeypatch.setenv("OPCM_RAY_FAULT", f"write:1:{flag}")  # after some output bytes were written
    with pytest.raises(BackendError, match=r"pass 'write'.*retries are off.*previous checkpoint is intact"):
        opcm_ext.merge_stream(family[0], out, family[3], device="cpu", executor="ray")
    assert not flag.exists()
    assert snapshot(out) == before  # step 2, byte for byte
    assert temporaries(out) == []
    monkeypatch.delenv("OPCM_RAY_FAULT")
    opcm_ext.merge_stream(family[0], out, family[3], device="cpu", executor="ray")
    assert snapshot(out) == want


# -- the command line ------------------------------------------------------------------------------------


def test_cli_step_with_executor_ray_joins_a_running_cluster(ray_instance, family, tmp_path):
    address = ray_instance.get_runtime_context().gcs_address
    local, remote = tmp_path / "local", tmp_path / "ray"
    opcm_ext.merge_sequence(family[0], family[1:3], local, method="ties", device="cpu", **METHODS["ties"])
    opcm_ext.merge_sequence(family[0], family[1:2], remote, method="ties", device="cpu", **METHODS["ties"])
    proc = run_cli("step", family[0], remote, family[2], "--executor", "ray", "--ray-address", address,
                   "--device", "cpu", "--no-progress", "--json")
    report = json.loads(proc.stdout)
    assert report["step"] == 2 and "ray_tasks" in report["timings"]
    assert snapshot(remote) == snapshot(local)


def test_cli_unreachable_cluster_is_a_clear_error(family, tmp_path):
    pytest.importorskip("ray")
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:9")  # nothing listens on the discard port
    proc = run_cli("merge", family[0], family[1], "-o", tmp_path / "m", "--executor", "ray", "--device", "cpu",
                   "--no-progress", check=False, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Ray cluster at 127.0.0.1:9" in proc.stderr and "ray start --head" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_fusionbench_compat_is_refused_under_ray(ray_instance, family, tmp_path):
    """compat fusionbench takes its norms over one whole-model vector in one process: a clear error, nothing written."""
    with pytest.raises(ConfigError, match=r"several processes, but --compat fusionbench .* use --executor local"):
        opcm_ext.merge_sequence(family[0], family[1:], tmp_path / "m", compat="fusionbench", device="cpu",
                                executor="ray")
    assert not (tmp_path / "m").exists() and not temporaries(tmp_path)
