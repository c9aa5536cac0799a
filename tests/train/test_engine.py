"""The process group's start and the weights read out of the engine, without a launcher."""
from __future__ import annotations

import pytest
import torch

from ds_kd.train import engine


class _FakeCuda:
    """The accelerator surface ``ds_kd.train.engine`` uses, as a machine with 4 GPUs: remembers the current device."""

    def __init__(self):
        self.current = 0

    def device_name(self):
        return "cuda"

    def communication_backend_name(self):
        return "nccl"

    def set_device(self, index):
        self.current = index


@pytest.mark.parametrize("local_rank", [1, 3])
def test_each_rank_runs_its_collectives_before_the_engine_on_its_local_gpu(local_rank, monkeypatch):
    """Under NCCL every rank left on cuda:0 makes the teacher's digest (an object all-gather before the engine)
    fail with "Duplicate GPU detected" or hang: the process group's start must select the local rank's GPU."""
    import deepspeed
    import deepspeed.accelerator

    acc, seen = _FakeCuda(), {}
    started = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: acc)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: started.append(acc.current))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: local_rank)
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, obj: seen.setdefault("gather_device", acc.current))
    for name, value in {"RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": 4,
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(name, str(value))

    engine.init_distributed()
    assert started == [local_rank]  # the device was chosen before the group started
    assert engine.device() == torch.device("cuda", local_rank)
    engine.replica_digests(torch.nn.Linear(2, 2))  # the teacher's digest, taken before the engine exists
    assert seen["gather_device"] == local_rank


def test_export_at_zero_stage_0_in_half_precision_is_the_fp32_master_weights(tiny_corpus, tmp_path, monkeypatch):
    """DeepSpeed's bf16/fp16 optimizer at ZeRO stage 0 updates fp32 master weights and copies them, rounded, into
    the module: the export must be the masters (what the checkpoint resumes from), not the rounded copy. (bf16 is
    forced: a CPU without native bf16 would otherwise train in fp32.)"""
    from ds_kd.models.model import BertForMaskedLM
    from ds_kd.train.engine import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    from ds_kd.train.pretrain import PretrainConfig, run

    out = tmp_path / "run"
    run(PretrainConfig(deepspeed_config="ds_configs/zero2.json", data=str(tiny_corpus), out=str(out),
                       model="tiny-base", max_steps=3, lr=1e-3, warmup_steps=1, num_workers=0, max_len=64,
                       ds_overrides={"zero_optimization.stage": 0, "fp16.enabled": False, "bf16.enabled": True,
                                     "train_micro_batch_size_per_gpu": 8}))
    saved = torch.load(out / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt", weights_only=False)
    masters = torch.cat([m.flatten() for group in saved["optimizer"]["fp32_groups"] for m in group]).sort().values
    exported = BertForMaskedLM.from_pretrained(out / "export")
    weights = torch.cat([p.detach().flatten() for p in exported.parameters()])  # tied weights once
    assert weights.dtype == torch.float32 and weights.numel() == masters.numel()
    assert torch.equal(weights.sort().values, masters)
    assert not torch.equal(weights, weights.bfloat16().float())  # not the module's rounded copy


def _build_lock(tmp_path, monkeypatch, age_s: float) -> Path:
    """A torch-extension build lock of DeepSpeed's CPU op, ``age_s`` seconds old, under a private build root."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / engine.SHM_OP / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_build_lock_left_by_a_killed_process_is_removed_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    lock = _build_lock(tmp_path, monkeypatch, age_s=engine.STALE_LOCK_SECONDS + 60)
    with caplog.at_level("INFO", logger="ds_kd"):
        engine.clear_stale_build_lock(engine.SHM_OP)
    assert not lock.exists()
    assert any(r.levelname == "WARNING" and str(lock) in r.getMessage() for r in caplog.records)
    assert any("compiles its CPU op" in r.getMessage() for r in caplog.records)  # no .so yet: it says so first


def test_a_held_build_lock_is_waited_for_and_left_to_its_holder(tmp_path, monkeypatch, caplog):
    import threading
    import time

    lock = _build_lock(tmp_path, monkeypatch, age_s=0)
    released = []
    holder = threading.Timer(0.5, lambda: (lock.unlink(), released.append(time.monotonic())))
    holder.start()
    with caplog.at_level("INFO", logger="ds_kd"):
        engine.clear_stale_build_lock(engine.SHM_OP, poll_s=0.05)
    returned = time.monotonic()
    holder.join()
    assert released and returned >= released[0]  # it waited for the holder instead of taking the lock away
    assert not any(r.levelname == "WARNING" for r in caplog.records)
    assert any("waiting for" in r.getMessage() for r in caplog.records)


def test_a_lock_that_stays_is_removed_once_stale_instead_of_hanging(tmp_path, monkeypatch):
    import time

    lock = _build_lock(tmp_path, monkeypatch, age_s=0)
    start = time.monotonic()
    engine.clear_stale_build_lock(engine.SHM_OP, stale_after_s=0.5, poll_s=0.05)
    assert not lock.exists() and 0.4 <= time.monotonic() - start < 5


def test_ops_are_built_under_this_python_environment_unless_the_user_says_where(tmp_path, monkeypatch):
    import os
    import sys
    from pathlib import Path

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert engine.use_environment_build_dir() == Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert engine.use_environment_build_dir() == tmp_path


def test_a_built_op_is_announced_too_since_torch_may_rebuild_it(tmp_path, monkeypatch, caplog):
    lock = _build_lock(tmp_path, monkeypatch, age_s=0)
    lock.unlink()
    (lock.parent / f"{engine.SHM_OP}.so").touch()
    with caplog.at_level("INFO", logger="ds_kd"):
        engine.clear_stale_build_lock(engine.SHM_OP)
    assert [r.getMessage() for r in caplog.records] == [
        f"DeepSpeed loads its CPU op {engine.SHM_OP} from {lock.parent} (a minute when torch finds it out of date "
        f"and rebuilds it)"]
