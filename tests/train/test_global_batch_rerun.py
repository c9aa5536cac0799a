"""A run resumed or extended where its global batch differs (fewer ranks with the same DeepSpeed JSON): one
message saying which override keeps the global batch, not the re-run rule's "pass --overwrite"."""
from __future__ import annotations

import json

import pytest

from ds_kd.errors import UsageError
from ds_kd.manifest import write_manifest
from ds_kd.train.pretrain import PretrainConfig
from ds_kd.train.training import SETTINGS_JSON, plan_out, train_settings


def config(tmp_path, **kw) -> PretrainConfig:
    return PretrainConfig(deepspeed_config="ds_configs/zero2.json", data=str(tmp_path / "corpus"),
                          out=str(tmp_path / "run"), model="tiny-leanbert",
                          ds_overrides={"train_micro_batch_size_per_gpu": 8}, **{"max_steps": 10, **kw})


def test_keep_global_batch_names_the_accumulation_else_a_micro_batch():
    from ds_kd.train.checkpoint import keep_global_batch

    assert keep_global_batch(64, 1, 32) == "--ds-override gradient_accumulation_steps=2"
    assert keep_global_batch(48, 2, 32) == ("--ds-override train_micro_batch_size_per_gpu=24 "
                                            "--ds-override gradient_accumulation_steps=1")
    assert keep_global_batch(9, 2, 4) == "a micro batch and accumulation whose product with the 2 ranks is 9"


@pytest.mark.parametrize("finished", [False, True])
def test_resume_or_extension_on_fewer_ranks_says_which_accumulation_keeps_the_global_batch(tmp_path, monkeypatch,
                                                                                           finished):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config(tmp_path)
    recorded = train_settings(cfg)
    assert recorded["global_batch"] == 16
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step5")
    if finished:
        write_manifest(out, stage="pretrain", settings=recorded, steps=10)
    else:
        (out / SETTINGS_JSON).write_text(json.dumps(recorded))
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = config(tmp_path, resume=True, **({"max_steps": 20} if finished else {}))
    with pytest.raises(UsageError) as err:
        plan_out(cfg, "pretraining", train_settings(cfg))
    message = str(err.value)
    assert message == (f"{out} holds a pretraining trained with a global batch of 16 sequences (micro batch x "
                       f"accumulation x ranks), this command's is 8 (1 ranks x micro batch 8 x accumulation 1); the "
                       f"data position and the learning-rate schedule count global batches: keep 16 with "
                       f"--ds-override gradient_accumulation_steps=2, or pass --overwrite to start over with 8")
    # with that override the same command goes on (an unfinished run resumes, a finished one is extended)
    cfg = config(tmp_path, resume=True, **({"max_steps": 20} if finished else {}))
    cfg.ds_overrides["gradient_accumulation_steps"] = 2
    assert plan_out(cfg, "pretraining", train_settings(cfg)) == ("extend" if finished else "resume")
    # another setting changed too: still the one message, naming it
    cfg = config(tmp_path, resume=True, lr=0.5)
    with pytest.raises(UsageError, match="gradient_accumulation_steps=2, or pass --overwrite to start over with 8; "
                                         "other settings differ too \\(lr: null -> 0.5"):
        plan_out(cfg, "pretraining", train_settings(cfg))
    cfg = config(tmp_path, overwrite=True)
    assert plan_out(cfg, "pretraining", train_settings(cfg)) == "overwrite"
