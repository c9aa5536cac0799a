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
