"""MLM pretraining under DeepSpeed: ``run(PretrainConfig) -> RunResult``.

The same ``run_training`` drives distillation (:mod:`ds_kd.distill.run`): only the model and the step
function differ. The run directory holds::

    <out>/checkpoints/   resumable DeepSpeed checkpoints (see ds_kd.checkpoint)
    <out>/metrics.jsonl  every logged metric by optimizer step; <out>/curves.png at the end
    <out>/export/        HF BertForMaskedLM directory + tokenizer (consolidated fp32 weights)
    <out>/manifest.json  written last: config, engine settings, data manifest, validation perplexity
"""
from __future__ import annotations

import json
import logging
import math
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
from ds_kd.manifest import has_manifest, read_manifest, write_manifest
from ds_kd.model import BertForMaskedLM, make_config, masked_lm_loss
from ds_kd.optim import LRSchedule, build_optimizer
from ds_kd.tokenizer_files import make_portable

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
    """Continue from the newest complete checkpoint in ``out``."""
    dist_timeout_minutes: float = 10.0
    """How long a rank waits for a peer in a collective before the job fails."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""


@dataclass
class PretrainConfig(TrainConfig):
    model: str = "mbert8-base"
    """Model preset (mbert8-large, mbert8-base, leanbert, tiny-large, tiny-base, tiny-leanbert), or the path of a
    Hugging Face BERT ``config.json`` (any shape; its vocabulary is replaced by the tokenizer's)."""


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


def mlm_step(engine, batch: dict, denominators: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MLM cross-entropy at the masked positions, summed and divided by the global batch's masked-token share
    ``denominators["masked"]`` (see :func:`ds_kd.loop.global_denominators`)."""
    masked_BT = batch["labels"].ne(-100)
    out = engine(batch["input_ids"], batch["attention_mask"], predicted=masked_BT,
                 position_ids=batch.get("position_ids"), sequence_ids=batch.get("sequence_ids"))
    loss = masked_lm_loss(out.logits, batch["labels"][masked_BT], denominators["masked"])
    return loss, {"mlm": loss}


def build_ds_config(cfg: TrainConfig) -> dict:
    from ds_kd.engine import apply_overrides, load_ds_config, resolve_precision

    return resolve_precision(apply_overrides(load_ds_config(cfg.deepspeed_config), cfg.ds_overrides))


def check_max_len(max_len: int, **models) -> None:
    """Raise ValueError (naming ``--max-len``) when a sample of ``max_len`` tokens would not fit the position
    table of one of ``models`` (name -> BertConfig); checked before any work, since on a shuffled corpus the
    first sentence that long may come hours in."""
    for name, config in models.items():
        if max_len > config.max_position_embeddings:
            raise ValueError(f"--max-len {max_len} exceeds the {name}'s {config.max_position_embeddings} position "
                             f"embeddings (max_position_embeddings); use --max-len {config.max_position_embeddings}"
                             f" or less")


def check_resume_identity(saved: dict, identity: dict, ckpt_dir: Path) -> None:
    """Raise ValueError when a fact the checkpoint was written under (e.g. the teacher's digest) differs now."""
    differ = [k for k, v in identity.items() if k in saved and saved[k] != v]
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {identity[k]!r}" for k in differ)
        raise ValueError(f"cannot resume {ckpt_dir}: it was written under other inputs ({detail})")


def run_training(cfg: TrainConfig, model: torch.nn.Module, step_fn: StepFn, mlm_model: BertForMaskedLM,
                 data: CorpusData, ds_config: dict, stage: str, extra_manifest: dict,
                 final_check: Callable[[], dict] | None = None, identity: dict | None = None) -> RunResult:
    """Engine, reader, resume, loop, export, manifest: everything but the model and the step.

    ``model`` is what the engine trains; ``mlm_model`` (the model itself, or the student inside it) is
    validated and exported. ``final_check`` runs on every rank after training, before the manifest; it may
    raise, or return more manifest fields. ``identity`` holds facts about inputs that are not in the
    checkpoint (the teacher's digest): stored in every checkpoint, and a resume under other values is refused
    before the first step."""
    from ds_kd.reader import ReaderConfig, ShardReader

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if checkpoint.latest_tag(ckpt_dir) and not cfg.resume:
        raise FileExistsError(f"{ckpt_dir} already holds a checkpoint: pass --resume to continue it, "
                              f"or choose a new --out")
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
    if cfg.resume:
        extras = checkpoint.load(engine, ckpt_dir)
        if extras is not None:
            check_resume_identity(extras, identity or {}, ckpt_dir)
            reader.load_state_dict(extras["reader"])
            start_step = extras["step"]
            log.info("resumed from %s at optimizer step %d", checkpoint.latest_tag(ckpt_dir), start_step)

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
                       reader.state_dict, identity)
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
                       **extra_manifest)
    dist.barrier()
    return RunResult(out, result.steps, result.losses, result.val, export_dir)


def export(model: BertForMaskedLM, tokenizer_dir: Path, export_dir: Path) -> Path | None:
    """Consolidated fp32 weights (gathered under ZeRO-3) + config + tokenizer as a HF directory, on rank 0."""
    state = dist.gather_full_state_dict(model)
    if dist.is_main():
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copy2(f, tmp / f.name)
        make_portable(tmp, merges=False)  # tokenizer.json stays byte-identical: its hash ties it to the shards
        shutil.rmtree(export_dir, ignore_errors=True)
        tmp.rename(export_dir)
    dist.barrier()
    return export_dir


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def finished_run(cfg: TrainConfig, what: str) -> RunResult | None:
    """The result of an already finished run in ``cfg.out`` (then the run is skipped), else None; checks the
    budget flags first so a bad command line fails before any work."""
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise ValueError("give exactly one of --max-steps and --epochs")
    if not has_manifest(cfg.out):
        return None
    log.info("%s/manifest.json exists: %s already finished, skipping", cfg.out, what)
    m = read_manifest(cfg.out)
    return RunResult(Path(cfg.out), m["steps"], [], m["val"], Path(cfg.out) / "export", skipped=True)


def run(cfg: PretrainConfig) -> RunResult:
    """Pretrain ``cfg.model`` with MLM on the corpus shards; skipped when ``cfg.out`` has a manifest."""
    if (done := finished_run(cfg, "pretraining")) is not None:
        return done
    data = resolve_data(cfg.data, cfg.tokenizer)
    model_cfg = make_config(cfg.model, vocab_size=data.vocab_size)  # validates the preset before any work
    check_max_len(cfg.max_len, model=model_cfg)
    dist.init_distributed(cfg.dist_timeout_minutes)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = BertForMaskedLM(model_cfg)
    torch.manual_seed(cfg.seed + 1000 * dist.rank())  # per-rank dropout
    return run_training(cfg, model, mlm_step, model, data, build_ds_config(cfg),
                        "pretrain", {"model": cfg.model, "model_config": asdict(model_cfg)})
