"""MLM pretraining under DeepSpeed: ``run(PretrainConfig) -> RunResult``.

The same ``run_training`` drives distillation (:mod:`ds_kd.distill.run`): only the model and the step
function differ. The run directory holds::

    <out>/checkpoints/   resumable DeepSpeed checkpoints (see ds_kd.checkpoint)
    <out>/metrics.jsonl  every logged metric by optimizer step; <out>/curves.png at the end
    <out>/export/        HF BertForMaskedLM directory + tokenizer (consolidated fp32 weights)
    <out>/manifest.json  written last: config, engine settings, data manifest, validation perplexity
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ds_kd import checkpoint
from ds_kd import engine as dist
from ds_kd.logbook import Logbook, WandbConfig
from ds_kd.loop import LoopConfig, StepFn, mlm_perplexity, train
from ds_kd.manifest import atomic_write_text, has_manifest, read_manifest, rerun_action, write_manifest
from ds_kd.model import BertForMaskedLM, make_config
from ds_kd.modeldir import record
from ds_kd.optim import LRSchedule, build_optimizer

log = logging.getLogger("ds_kd")


@dataclass
class TrainConfig:
    """Settings shared by pretraining and distillation (engine settings live in the DeepSpeed JSON)."""

    deepspeed_config: str
    """DeepSpeed JSON (ZeRO stage, precision, micro batch, accumulation, clipping)."""
    data: str
    """Corpus directory of ``python -m data_prep corpus`` (holding shards/ and tokenizer/), or a shards dir."""
    out: str
    """Run directory to write (checkpoints, metrics, export, manifest)."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the corpus's tokenizer/); must be the one the shards were written with."""
    ds_overrides: dict = field(default_factory=dict)
    """Dotted-key overrides of the DeepSpeed JSON, each logged (e.g. {"train_micro_batch_size_per_gpu": 8})."""
    max_steps: int | None = None
    """Optimizer steps to train for; exclusive with ``epochs``."""
    epochs: float | None = None
    """Passes over the training shards (converted to optimizer steps with the engine's global batch)."""
    optimizer: str = "adamw"
    """adamw or lamb."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (not on biases and LayerNorm)."""
    warmup_steps: int = 0
    """Linear warmup steps (default: 6% of the run when 0 and ``warmup_ratio`` > 0)."""
    warmup_ratio: float = 0.06
    """Warmup as a fraction of the run, used when ``warmup_steps`` is 0."""
    decay: str = "linear"
    """Decay after warmup: linear, cosine or constant."""
    max_len: int = 128
    """Truncate samples to this many tokens (special tokens included)."""
    num_workers: int = 2
    """DataLoader workers per rank (masking and collation run there)."""
    shuffle_buffer: int = 10000
    """Samples held in each worker's shuffle buffer."""
    seed: int = 1234
    """Seed of initialisation, data order, masking and dropout."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    eval_every: int = 0
    """Validate every N optimizer steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``out``; on a finished run whose settings differ only in
    ``max_steps``/``epochs``, extend it to the new, larger budget."""
    overwrite: bool = False
    """Start over when ``out`` already holds a run (finished or not), whatever its settings."""
    dist_timeout_minutes: float = 10.0
    """How long a rank waits for a peer in a collective before the job fails."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""


@dataclass
class PretrainConfig(TrainConfig):
    model: str = "mbert8-base"
    """Model preset (mbert8-large, mbert8-base, leanbert, tiny-large, tiny-base, tiny-leanbert)."""


@dataclass
class RunResult:
    out: Path
    steps: int
    losses: list[float]
    val: dict[str, float]
    export_dir: Path | None
    skipped: bool = False


@dataclass
class CorpusData:
    shard_dir: Path
    tokenizer_dir: Path
    manifest: dict
    vocab_size: int


def resolve_data(data: str | Path, tokenizer: str | Path | None) -> CorpusData:
    """Find the shards and the tokenizer and check they belong together, before anything is built."""
    from ds_kd.schema import check_tokenizer_matches

    data = Path(data)
    shard_dir = data / "shards" if (data / "shards").is_dir() else data
    manifest = read_manifest(shard_dir, needed_by="training")
    tokenizer_dir = Path(tokenizer) if tokenizer else shard_dir.parent / "tokenizer"
    check_tokenizer_matches(manifest, tokenizer_dir)
    return CorpusData(shard_dir, tokenizer_dir, manifest, int(manifest["vocab_size"]))


def num_train_samples(manifest: dict) -> int:
    return sum(int(s["num_samples"]) for s in manifest["splits"]["train"]["shards"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mlm_step(engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = engine(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    return out.loss, {"mlm": out.loss}


def build_ds_config(cfg: TrainConfig) -> dict:
    from ds_kd.engine import apply_overrides, load_ds_config, resolve_precision

    return resolve_precision(apply_overrides(load_ds_config(cfg.deepspeed_config), cfg.ds_overrides))


def run_training(cfg: TrainConfig, model: torch.nn.Module, step_fn: StepFn, mlm_model: BertForMaskedLM,
                 data: CorpusData, ds_config: dict, stage: str, extra_manifest: dict,
                 final_check: Callable[[], dict] | None = None, run_settings: dict | None = None,
                 action: str = "start") -> RunResult:
    """Engine, reader, resume, loop, export, manifest: everything but the model and the step.

    ``model`` is what the engine trains; ``mlm_model`` (the model itself, or the student inside it) is
    validated and exported. ``final_check`` runs on every rank after training, before the manifest; it may raise, or return more
    manifest fields. ``run_settings`` and ``action`` come from :func:`plan_out` (every rank decided before the
    process group existed, so before anything here changes ``cfg.out``)."""
    from ds_kd.reader import ReaderConfig, ShardReader

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if dist.is_main():
        prepare_out(out, action, run_settings or {})
    dist.barrier()
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO partitions
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    schedule = LRSchedule()  # its length needs the global batch, which only the engine knows
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine = dist.build_engine(model, ds_config, optimizer, scheduler)
    settings = dist.engine_settings(engine)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * num_train_samples(data.manifest)
                                                    / settings["global_batch"]))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    schedule.set(warmup, total_steps, cfg.decay, scheduler)
    log.info("engine: %s; %d optimizer steps (warmup %d); %d trainable parameters", settings, total_steps, warmup,
             num_trainable)

    reader = ShardReader(ReaderConfig(shard_dir=str(data.shard_dir), split="train",
                                      micro_batch_size=settings["micro_batch_per_rank"], seed=cfg.seed,
                                      shuffle_buffer=cfg.shuffle_buffer, num_workers=cfg.num_workers,
                                      max_len=cfg.max_len), dist.rank(), dist.world_size())
    start_step = 0
    if action in ("resume", "extend"):
        extras = checkpoint.load(engine, ckpt_dir)
        if extras is None and action == "extend":
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint of the finished run to extend")
        if extras is not None:
            reader.load_state_dict(extras["reader"])
            start_step = extras["step"]
            schedule.set(warmup, total_steps, cfg.decay, scheduler)  # the loaded scheduler brought the old length
            log.info("resumed from %s at optimizer step %d", checkpoint.latest_tag(ckpt_dir), start_step)
        if start_step >= total_steps:
            raise ValueError(f"{out}: {start_step} optimizer steps are already done; the budget asks for "
                             f"{total_steps}: give a larger --max-steps/--epochs to extend the run")

    def evaluate() -> dict[str, float]:
        val = ShardReader(ReaderConfig(shard_dir=str(data.shard_dir), split="val",
                                       micro_batch_size=settings["micro_batch_per_rank"], seed=cfg.seed,
                                       num_workers=0, epochs=1, max_len=cfg.max_len), dist.rank(), dist.world_size())
        return mlm_perplexity(mlm_model, val)

    run_config = {"stage": stage, **_jsonable(asdict(cfg)), "engine": settings, "total_steps": total_steps,
                  "num_trainable_params": num_trainable}
    logbook = Logbook(out, dist.is_main(), cfg.wandb, run_config, total_steps, start_step)
    try:
        loop_cfg = LoopConfig(total_steps, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_last)
        result = train(engine, reader, step_fn, evaluate, logbook, ckpt_dir, loop_cfg, start_step,
                       reader.state_dict)
    finally:
        logbook.close()
    digests = dist.replica_digests(engine.module)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights differ after training (digests {digests}): replicas diverged")
    if final_check is not None:
        extra_manifest = {**extra_manifest, **final_check()}
    export_dir = export(mlm_model, data.tokenizer_dir, out / "export")
    if dist.is_main():
        write_manifest(out, stage, config=run_config, data_manifest=str(data.shard_dir / "manifest.json"),
                       steps=result.steps, val=result.val, export="export", replica_digests=digests,
                       settings=run_settings, **extra_manifest)
    dist.barrier()
    return RunResult(out, result.steps, result.losses, result.val, export_dir)


def export(model: BertForMaskedLM, tokenizer_dir: Path, export_dir: Path) -> Path | None:
    """Consolidated fp32 weights (gathered under ZeRO-3) + config + tokenizer as a HF directory, on rank 0.

    ``config.json`` records ``"ds_kd": {"segment_ids_trained": false}`` (see :mod:`ds_kd.modeldir`)."""
    state = dist.gather_full_state_dict(model)
    if dist.is_main():
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        record(tmp, segment_ids_trained=False)  # training passes no token types: row 1 never learns
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name != "manifest.json" and not (tmp / f.name).exists():  # never the model's files
                shutil.copy2(f, tmp / f.name)
        shutil.rmtree(export_dir, ignore_errors=True)
        tmp.rename(export_dir)
    dist.barrier()
    return export_dir


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


SETTINGS_JSON = "settings.json"
"""The settings of the run in progress (the finished run's are in its manifest), for ``--resume``."""
RUN_OUTPUTS = ("checkpoints", "export", "export.tmp", "metrics.jsonl", "curves.png", SETTINGS_JSON, "manifest.json")


def train_settings(cfg: TrainConfig) -> dict:
    """What determines a training run's result (compared when ``cfg.out`` already holds a run): the data (its
    shards directory and a digest of its manifest), the DeepSpeed JSON's content and overrides, the number of
    ranks, the budget, the optimisation and data-order flags. Not: logging, checkpoint cadence, W&B, paths of
    the output. The stage adds its model (and teacher and losses)."""
    from ds_kd.engine import load_ds_config

    data = Path(cfg.data)
    shard_dir = data / "shards" if (data / "shards").is_dir() else data
    manifest = shard_dir / "manifest.json"
    names = ("max_steps", "epochs", "optimizer", "lr", "weight_decay", "warmup_steps", "warmup_ratio", "decay",
             "max_len", "num_workers", "shuffle_buffer", "seed")
    return {"data": str(shard_dir.resolve()),
            "data_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
            "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
            "deepspeed_config": load_ds_config(cfg.deepspeed_config), "ds_overrides": cfg.ds_overrides,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), **{n: getattr(cfg, n) for n in names}}


def plan_out(cfg: TrainConfig, what: str, settings: dict) -> str:
    """What to do with ``cfg.out`` (``ds_kd.manifest.rerun_action``'s rule): start, skip, overwrite, resume or
    extend; raises naming the settings that differ. Checks the budget flags first, so a bad command line fails
    before any work."""
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise ValueError("give exactly one of --max-steps and --epochs")
    out = Path(cfg.out)
    finished = has_manifest(out)
    recorded = (read_manifest(out).get("settings") if finished
                else _read_json(out / SETTINGS_JSON))
    action = rerun_action(out, what, recorded, settings, finished=finished,
                          unfinished=checkpoint.latest_tag(out / "checkpoints") is not None, overwrite=cfg.overwrite,
                          resume=cfg.resume)
    if action == "skip":
        log.info("%s/manifest.json: %s already finished with the same settings: skipping (--overwrite runs it "
                 "again)", out, what)
    elif action in ("extend", "overwrite"):
        log.info("%s: %s", out, "extending the finished run to the new budget" if action == "extend"
                 else "--overwrite: starting over")
    return action


def skipped_result(cfg: TrainConfig) -> RunResult:
    m = read_manifest(cfg.out)
    return RunResult(Path(cfg.out), m["steps"], [], m["val"], Path(cfg.out) / "export", skipped=True)


def prepare_out(out: Path, action: str, settings: dict) -> None:
    """Rank 0, before training: clear the old run (overwrite) and record the settings of the run about to train.
    An extended run keeps its manifest and export until the new ones replace them: a crash midway leaves the
    finished run as it was, and ``--resume`` with the larger budget continues from the newest checkpoint."""
    if action == "overwrite":
        for name in RUN_OUTPUTS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_JSON, json.dumps(_jsonable(settings), indent=2) + "\n")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run(cfg: PretrainConfig) -> RunResult:
    """Pretrain ``cfg.model`` with MLM on the corpus shards; ``cfg.out`` holding a run: see :func:`plan_out`."""
    settings = {**train_settings(cfg), "model": cfg.model}
    action = plan_out(cfg, "pretraining", settings)
    if action == "skip":
        return skipped_result(cfg)
    data = resolve_data(cfg.data, cfg.tokenizer)
    model_cfg = make_config(cfg.model, vocab_size=data.vocab_size)  # validates the preset before any work
    dist.init_distributed(cfg.dist_timeout_minutes)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = BertForMaskedLM(model_cfg)
    torch.manual_seed(cfg.seed + 1000 * dist.rank())  # per-rank dropout
    return run_training(cfg, model, mlm_step, model, data, build_ds_config(cfg),
                        "pretrain", {"model": cfg.model, "model_config": asdict(model_cfg)}, run_settings=settings,
                        action=action)
