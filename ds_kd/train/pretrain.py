"""MLM pretraining under DeepSpeed: ``run(PretrainConfig) -> RunResult``.

This module only builds the model and its MLM step; the run machinery (re-run rule, engine, reader, resume,
loop, validation, export, manifest) is :func:`ds_kd.train.training.run_stage`, shared with distillation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ds_kd.train.loop import masked_positions
from ds_kd.models.model import BertForMaskedLM, gather_predicted, masked_lm_loss
from ds_kd.train.training import (CorpusData, EngineSetup, Job, RunResult, StagePlan, TrainConfig, model_config,
                            run_stage)
from ds_kd.models.warmstart import FROM_INIT, init_model


@dataclass
class PretrainConfig(TrainConfig):
    model: str = "mbert8-base"
    """Model preset (mbert8-large, mbert8-base, leanbert, tiny-large, tiny-base, tiny-leanbert), the path of a
    Hugging Face BERT ``config.json`` (any shape; its vocabulary is replaced by the tokenizer's), or from-init:
    the shape of ``init_from`` (with ``len(init_layers)`` layers)."""


def mlm_step(engine, batch: dict, denominators: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MLM cross-entropy at the masked positions, summed and divided by the global batch's masked-token share
    ``denominators["masked"]`` (see :func:`ds_kd.train.loop.global_denominators`). Uses the host-built masked positions
    and per-sentence layout of :func:`ds_kd.train.loop.host_layout` when the batch has them."""
    predicted = masked_positions(batch)
    out = engine(batch["input_ids"], batch["attention_mask"], predicted=predicted,
                 position_ids=batch.get("position_ids"), sequence_ids=batch.get("sequence_ids"),
                 sentence_buckets=batch.get("sentence_buckets"))
    loss = masked_lm_loss(out.logits, gather_predicted(batch["labels"], predicted), denominators["masked"])
    return loss, {"mlm": loss}


def run(cfg: PretrainConfig) -> RunResult:
    """Pretrain ``cfg.model`` with MLM on the corpus shards (from ``cfg.init_from``'s weights when given);
    ``cfg.out`` holding a run: see :func:`ds_kd.train.training.plan_out`. Raises ValueError for a bad preset or
    ``--init-from``/``--init-layers`` combination before any work."""

    def plan(data: CorpusData) -> StagePlan:
        model_cfg = model_config(cfg.model, data, cfg.init_from, cfg.init_layers)

        def build(setup: EngineSetup) -> Job:
            model = BertForMaskedLM(model_cfg)
            init = None
            if cfg.init_from:
                init = init_model(model, BertForMaskedLM.from_pretrained(cfg.init_from), cfg.init_layers)
            return Job(model, mlm_step, model,
                       {"model": cfg.model, "model_config": asdict(model_cfg), "init": init})

        return StagePlan({"model": model_cfg}, build)

    return run_stage(cfg, "pretrain", "pretraining", {"model": cfg.model}, plan,
                     cfg.init_from if cfg.model == FROM_INIT else cfg.model)
