"""The run machinery shared by pretraining and distillation: ``run_stage(cfg, ...) -> RunResult``.

A stage (:mod:`ds_kd.train.pretrain`, :mod:`ds_kd.distill.run`) only says what it trains: its settings, the model
configs to check against ``--max-len``, and a builder of the model and its step (:class:`StagePlan`). This
module does the rest, in the same order for every stage: the re-run rule (skip, refuse, resume, extend,
overwrite), the data, the DeepSpeed JSON, the process group, the engine, the reader, resume, the loop,
validation, the export and the manifest. The run directory holds::

    <out>/checkpoints/   resumable DeepSpeed checkpoints (see ds_kd.train.checkpoint)
    <out>/metrics.jsonl  every logged metric by optimizer step; <out>/curves.png at the end
    <out>/ds_config.json the effective DeepSpeed config (after overrides and the precision fallback)
    <out>/settings.json  the settings of the run in progress (for --resume)
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ds_kd.train import checkpoint
from ds_kd.train import engine as dist
from ds_kd.errors import UsageError
from ds_kd.logbook import Logbook, WandbConfig
from ds_kd.train.loop import LoopConfig, StepFn, host_layout, mlm_perplexity, train
from ds_kd.manifest import (BUDGET_KEYS, atomic_write_text, describe_differences, has_manifest, read_json_file,
                             read_manifest, remove_outputs, rerun_action, settings_differences, write_manifest)
from ds_kd.models.model import BertConfig, BertForMaskedLM, default_lr
from ds_kd.models.modeldir import record
from ds_kd.train.optim import LRSchedule, build_optimizer
from ds_kd.data.tokenizer_files import make_portable
from ds_kd.models.warmstart import student_config

if TYPE_CHECKING:
    from ds_kd.train.ds_config import OptimizerSpec

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
    optimizer: str | None = None
    """adamw or lamb (None: the DeepSpeed JSON's optimizer block, else adamw)."""
    lr: float | None = None
    """Peak learning rate (None: the JSON's optimizer block, else the model's default: ``ds_kd.models.model.default_lr``,
    2e-3 for the tiny presets, else 1e-4)."""
    weight_decay: float | None = None
    """Decoupled weight decay on matrices, not on biases and LayerNorm (None: the JSON's, else 0.01)."""
    warmup_steps: int | None = None
    """Linear warmup steps (None or 0: ``warmup_ratio`` of the run). Exclusive with a JSON scheduler block,
    like ``warmup_ratio`` and ``decay``."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the run, used when ``warmup_steps`` is 0 (None: 0.06)."""
    decay: str | None = None
    """Decay after warmup: linear, cosine or constant (None: linear)."""
    max_len: int = 128
    """Truncate samples to this many tokens (special tokens included); with packing, the row length."""
    packing: bool = True
    """Pack whole sentences into rows of ``max_len`` tokens with block-diagonal attention (training and
    validation); the micro batch then counts rows. False: one sentence per row, padded to the batch's longest."""
    num_workers: int = 2
    """DataLoader workers per rank (masking and collation run there)."""
    shuffle_window: int = 8
    """Shard blocks whose sentences are shuffled together (see ds_kd.data.reader)."""
    lang_mix: str = "corpus"
    """``corpus``: the shards' own mix of languages; ``balanced``: equal sentences per language in every epoch,
    each optimizer step from one language (BiStil; :mod:`ds_kd.data.lang_mix`; needs ``packing`` off)."""
    seed: int = 1234
    """Seed of initialisation, data order, masking and dropout."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    eval_every: int = 0
    """Validate every N optimizer steps (0: only at the end)."""
    save_every: int = 1000
    """Checkpoint every N optimizer steps (0: only by time and at the end)."""
    save_every_minutes: float = 30.0
    """Also checkpoint when this many minutes of wall time passed since the last checkpoint (0: never by
    time), so a crash loses at most this much work."""
    keep_last: int = 2
    """Checkpoints to keep."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``out``; on a finished run whose settings differ only in
    ``max_steps``/``epochs``, extend it to the new, larger budget."""
    overwrite: bool = False
    """Start over when ``out`` already holds a run (finished or not), whatever its settings."""
    dist_timeout_minutes: float = 10.0
    """How long a rank waits for a peer in a collective before the job fails."""
    convert_timeout_minutes: float = 120.0
    """How long ranks other than 0 wait for rank 0 to convert a checkpoint to a universal one (a resume on
    another number of ranks) before the job fails; they wait on a file, not in a collective."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""
    init_from: str | None = None
    """Checkpoint directory (HF BERT) whose weights the trained model starts from (see ds_kd.models.warmstart)."""
    init_layers: list[int] | None = None
    """1-based layers of ``init_from`` to copy, in order, with its embeddings (None: the whole checkpoint)."""


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
    special_ids: dict[str, int] = field(default_factory=dict)
    """The tokenizer's special ids by role (pad, cls, sep, mask, ...), from the shards manifest."""


def resolve_data(data: str | Path, tokenizer: str | Path | None) -> CorpusData:
    """Find the shards and the tokenizer and check they belong together, and that the shards record the
    tokenizer's special ids, before anything is built."""
    from ds_kd.data.shards import special_ids
    from ds_kd.schema import check_tokenizer_matches

    data = Path(data)
    shard_dir = data / "shards" if (data / "shards").is_dir() else data
    manifest = read_manifest(shard_dir, needed_by="training")
    tokenizer_dir = Path(tokenizer) if tokenizer else shard_dir.parent / "tokenizer"
    check_tokenizer_matches(manifest, tokenizer_dir)
    return CorpusData(shard_dir, tokenizer_dir, manifest, int(manifest["vocab_size"]), special_ids(manifest, shard_dir))


def model_config(shape: str, data: CorpusData, init_from: str | None = None,
                 init_layers: list[int] | None = None, init_flag: str = "--init-from") -> BertConfig:
    """The config for training on ``data``: a preset, or the ``--init-from`` checkpoint's shape (see
    :func:`ds_kd.models.warmstart.student_config`, which raises ValueError for a bad combination), with the
    tokenizer's vocabulary size and pad id. Raises UsageError naming ``init_flag`` when ``init_from`` has a
    tokenizer other than the corpus's (:func:`ds_kd.schema.check_model_tokenizer`)."""
    from ds_kd.schema import check_model_tokenizer

    if init_from:
        check_model_tokenizer(init_from, init_flag, data.manifest, data.tokenizer_dir)
    return replace(student_config(shape, data.vocab_size, init_from, init_layers),
                   pad_token_id=data.special_ids["pad"])


def num_train_samples(manifest: dict) -> int:
    return sum(int(s["num_samples"]) for s in manifest["splits"]["train"]["shards"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EngineSetup:
    """The checked DeepSpeed config and what the run builds beside it."""

    ds_config: dict
    """What ``deepspeed.initialize`` gets: the JSON after overrides and the precision fallback, without its
    optimizer block (the optimizer is built here)."""
    optimizer: "OptimizerSpec"
    ds_scheduler: bool
    """True: the JSON's scheduler block, built by DeepSpeed; False: ``ds_kd.train.optim.LRSchedule``."""


def check_train_flags(cfg: TrainConfig) -> None:
    """One-line errors naming the flag, before anything is built or created."""
    if (cfg.max_steps is None) == (cfg.epochs is None):
        raise UsageError("give exactly one of --max-steps and --epochs")
    positive = {"--max-steps": cfg.max_steps, "--epochs": cfg.epochs, "--max-len": cfg.max_len,
                "--shuffle-window": cfg.shuffle_window, "--log-every": cfg.log_every,
                "--dist-timeout-minutes": cfg.dist_timeout_minutes,
                "--convert-timeout-minutes": cfg.convert_timeout_minutes}
    not_negative = {"--num-workers": cfg.num_workers, "--eval-every": cfg.eval_every,
                    "--save-every": cfg.save_every, "--save-every-minutes": cfg.save_every_minutes,
                    "--keep-last": cfg.keep_last, "--warmup-steps": cfg.warmup_steps, "--lr": cfg.lr,
                    "--weight-decay": cfg.weight_decay}
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    for flag, value in not_negative.items():
        if value is not None and value < 0:
            raise UsageError(f"{flag} must not be negative, got {value}")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise UsageError(f"--warmup-ratio must lie in [0, 1), got {cfg.warmup_ratio}")


def build_ds_config(cfg: TrainConfig, default_lr: float | None = None) -> EngineSetup:
    """Load the DeepSpeed JSON, apply the overrides and the precision fallback, and check it all (unknown keys,
    DeepSpeed's own validation, the optimizer and scheduler blocks against the flags) before any work;
    ``default_lr``: the model's peak rate where neither ``--lr`` nor the JSON gives one (``ds_kd.models.model.default_lr``).
    Raises ValueError naming the file, the override or the flag."""
    from ds_kd.train.ds_config import check_ds_config, check_keys, check_scheduler, resolve_optimizer
    from ds_kd.train.engine import apply_overrides, load_ds_config, resolve_precision

    source = str(cfg.deepspeed_config)
    check_keys([key.split(".")[0] for key in cfg.ds_overrides], "--ds-override")
    config = resolve_precision(apply_overrides(load_ds_config(source), cfg.ds_overrides))
    check_ds_config(config, source)
    optimizer, config = resolve_optimizer(
        config, {"optimizer": cfg.optimizer, "lr": cfg.lr, "weight_decay": cfg.weight_decay}, source, default_lr)
    ds_scheduler = check_scheduler(
        config, {"warmup_steps": cfg.warmup_steps, "warmup_ratio": cfg.warmup_ratio, "decay": cfg.decay}, source)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    half = [m for m in ("fp16", "bf16") if config.get(m, {}).get("enabled")]
    if optimizer.name == "lamb" and (stage > 0 or half):
        # ZeRO, and DeepSpeed's fp16/bf16 optimizers at stage 0 too, hand the optimizer flat buffers of many
        # tensors: a trust ratio ||w|| / ||update|| taken there mixes layers, which is not LAMB. Only fp32 at
        # stage 0 keeps whole tensors.
        where = f"ZeRO stage {stage}" if stage > 0 else f"{half[0]} (DeepSpeed's {half[0]} optimizer)"
        raise UsageError(f"LAMB needs whole tensors for its layer-wise trust ratio, but {where} ({source}) hands "
                         f"the optimizer flat buffers; use --ds-override zero_optimization.stage=0 with fp32 "
                         f"(--ds-override fp16.enabled=false, bf16 off), or AdamW")
    return EngineSetup(config, optimizer, ds_scheduler)


def check_max_len(max_len: int, **models) -> None:
    """Raise ValueError (naming ``--max-len``) when a sample of ``max_len`` tokens would not fit the position
    table of one of ``models`` (name -> BertConfig); checked before any work, since on a shuffled corpus the
    first sentence that long may come hours in."""
    for name, config in models.items():
        if max_len > config.max_position_embeddings:
            raise UsageError(f"--max-len {max_len} exceeds the {name}'s {config.max_position_embeddings} position "
                             f"embeddings (max_position_embeddings); use --max-len {config.max_position_embeddings}"
                             f" or less")


def check_resume_identity(saved: dict, identity: dict, ckpt_dir: Path) -> None:
    """Raise ValueError when a fact the checkpoint was written under (e.g. the teacher's digest) differs now."""
    differ = [k for k, v in identity.items() if k in saved and saved[k] != v]
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved[k]!r}, now {identity[k]!r}" for k in differ)
        raise UsageError(f"cannot resume {ckpt_dir}: it was written under other inputs ({detail})")


def run_training(cfg: TrainConfig, job: Job, data: CorpusData, setup: EngineSetup, stage: str,
                 run_settings: dict, action: str) -> RunResult:
    """Engine, reader, resume, loop, export, manifest: everything but the model and the step (``job``).

    ``run_settings`` and ``action`` come from :func:`plan_out` (every rank decided before the process group
    existed, so before anything here changes ``cfg.out``). Raises FileNotFoundError when an extended run has
    no checkpoint, ValueError when a resume is refused (other topology rules, other ``job.identity``, a budget
    already spent), RuntimeError when the ranks' weights differ after training."""
    from ds_kd.data.reader import ReaderConfig, ShardReader

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    model, mlm_model = job.model, job.mlm_model
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO partitions
    spec = setup.optimizer
    optimizer = build_optimizer(model, spec.name, spec.lr, spec.weight_decay, spec.betas, spec.eps)
    schedule = LRSchedule()  # its length needs the global batch, which only the engine knows
    scheduler = None if setup.ds_scheduler else torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ds_config = setup.ds_config
    # The reader and a resume are checked before the engine is built, so a bad resume fails in seconds.
    resume = None
    if action in ("resume", "extend"):
        resume = checkpoint.plan_resume(ckpt_dir, ds_config, type(optimizer).__name__)
        if resume is None and action == "extend":
            raise FileNotFoundError(f"{ckpt_dir}: no checkpoint of the finished run to extend")
    on_gpu = dist.device().type == "cuda"
    if on_gpu:  # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 sums); cuDNN already allows it
        torch.set_float32_matmul_precision("high")
    # The workers build what the step needs from the ids on the host (host_layout), into pinned memory on a GPU.
    batch = checkpoint.batch_settings(ds_config)
    reader = ShardReader(ReaderConfig(shard_dir=str(data.shard_dir), split="train",
                                      micro_batch_size=batch["micro_batch_per_rank"],
                                      seed=cfg.seed, shuffle_window=cfg.shuffle_window, num_workers=cfg.num_workers,
                                      max_len=cfg.max_len, packing=cfg.packing, pin_memory=on_gpu,
                                      lang_run=batch["global_batch"] if cfg.lang_mix == "balanced" else None),
                         dist.rank(), dist.world_size(), prepare=host_layout)
    if resume is not None:
        check_resume_identity(resume.state, job.identity or {}, ckpt_dir)
        reader.load_state_dict(resume.state["reader"])
        ds_config = checkpoint.prepare(resume, ds_config, cfg.convert_timeout_minutes)
    if dist.is_main():  # after the resume checks: a refused resume leaves the recorded settings as they were
        prepare_out(out, action, run_settings or {})
    dist.barrier()
    engine = dist.build_engine(model, ds_config, optimizer, scheduler)
    settings = dist.engine_settings(engine)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * reader.steps_per_epoch(settings["global_batch"])))
    if setup.ds_scheduler:
        schedule_text = f"the config's {setup.ds_config['scheduler']['type']} schedule"
    else:
        warmup = cfg.warmup_steps or int((0.06 if cfg.warmup_ratio is None else cfg.warmup_ratio) * total_steps)
        schedule.set(warmup, total_steps, cfg.decay or "linear", scheduler)
        schedule_text = f"warmup {warmup}, {cfg.decay or 'linear'} decay"
    log.info("engine: %s; %s (%s); %d optimizer steps (%s); %d trainable parameters", settings, spec.name,
             spec.source, total_steps, schedule_text, num_trainable)
    log.info("%s", start_banner(reader.num_samples, reader.steps_per_epoch(settings["global_batch"]), total_steps,
                                settings, cfg.max_len, cfg.packing))
    if dist.is_main():
        from ds_kd.train.ds_config import write_effective_config

        write_effective_config(setup.ds_config, spec, out / "ds_config.json")

    start_step, elapsed_before, sentences_before = 0, 0.0, 0
    if resume is not None:
        start_step = checkpoint.load(engine, resume)["step"]
        elapsed_before = resume.state.get("elapsed_s", 0.0)
        sentences_before = resume.state.get("sentences_seen", 0)  # 0 from checkpoints written before it was kept
        if not setup.ds_scheduler:  # the loaded scheduler brought the old run's length
            schedule.set(warmup, total_steps, cfg.decay or "linear", scheduler)
        log.info("resumed from %s at optimizer step %d", resume.tag, start_step)
        if start_step >= total_steps:
            raise UsageError(f"{out}: {start_step} optimizer steps are already done; the budget asks for "
                             f"{total_steps}: give a larger --max-steps/--epochs to extend the run")

    def evaluate() -> dict[str, float]:
        if not job.perplexity:
            return {}
        val = ShardReader(ReaderConfig(shard_dir=str(data.shard_dir), split="val",
                                       micro_batch_size=settings["micro_batch_per_rank"], seed=cfg.seed,
                                       num_workers=0, epochs=1, max_len=cfg.max_len, packing=cfg.packing),
                           dist.rank(), dist.world_size())
        return mlm_perplexity(mlm_model, val)

    run_config = {"stage": stage, **_jsonable(asdict(cfg)), "engine": settings, "total_steps": total_steps,
                  "num_trainable_params": num_trainable}
    logbook = Logbook(out, dist.is_main(), cfg.wandb, run_config, total_steps, start_step, elapsed_before)
    try:
        loop_cfg = LoopConfig(total_steps, cfg.log_every, cfg.eval_every, cfg.save_every, cfg.keep_last,
                              cfg.save_every_minutes, reader.num_samples, reader.sentences_per_lang)
        result = train(engine, reader, job.step, evaluate, logbook, ckpt_dir, loop_cfg, start_step,
                       reader.state_dict, job.identity, sentences_before)
    finally:
        logbook.close()
    digests = dist.replica_digests(engine.module)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights differ after training (digests {digests}): replicas diverged")
    extra_manifest = {**job.manifest, **(job.final_check() if job.final_check is not None else {})}
    export_dir = export(mlm_model, data.tokenizer_dir, out / "export", data.special_ids, engine.optimizer)
    if dist.is_main():
        write_manifest(out, stage, config=run_config, data_manifest=str(data.shard_dir / "manifest.json"),
                       steps=result.steps, val=result.val, export="export", replica_digests=digests,
                       packing_efficiency=result.packing_efficiency, settings=run_settings,
                       perplexity_measured=job.perplexity,
                       **extra_manifest)
    dist.barrier()
    log.info("finished %s: %d optimizer steps (%d in this process), %s tokens in %.1f s (%.0f tokens/s), "
             "validation perplexity %.3f; export: %s", out, result.steps, result.steps - start_step,
             f"{result.tokens:,}", result.seconds, result.tokens / max(result.seconds, 1e-9),
             result.val.get("val_ppl", math.nan), export_dir)
    return RunResult(out, result.steps, result.losses, result.val, export_dir)


def start_banner(num_sentences: int, steps_per_epoch: float, total_steps: int, settings: dict, max_len: int,
                 packing: bool) -> str:
    """The run's size in one line: training sentences, epochs (``total_steps / steps_per_epoch``), optimizer
    steps, the global batch as micro batch x accumulation x ranks (``settings``: :func:`ds_kd.train.engine.engine_settings`)
    and the most tokens one optimizer step holds (global batch x ``max_len``; packed rows fill nearly all of it)."""
    unit = "rows" if packing else "sentences"
    batch = settings["global_batch"]
    return (f"training on {num_sentences:,} sentences (train split) for {total_steps / steps_per_epoch:.3g} epochs "
            f"= {total_steps:,} optimizer steps; global batch {batch:,} {unit} (micro batch "
            f"{settings['micro_batch_per_rank']} x accumulation {settings['gradient_accumulation_steps']} x "
            f"{settings['world_size']} ranks), up to {batch * max_len:,} tokens per optimizer step "
            f"({batch:,} {unit} x --max-len {max_len})")


def export(model: BertForMaskedLM, tokenizer_dir: Path, export_dir: Path,
           special_ids: dict[str, int], optimizer=None) -> Path | None:
    """Consolidated fp32 weights (gathered under ZeRO-3; the fp32 master weights of the engine's ``optimizer``
    where it keeps them, see :func:`ds_kd.train.engine.gather_full_state_dict`) + config + tokenizer as a HF
    directory, on rank 0.

    ``special_ids``: the tokenizer's by role (:attr:`CorpusData.special_ids`); ``config.json`` carries them
    (``pad_token_id``, and ``bos_token_id``/``eos_token_id`` where the tokenizer has them) and
    ``"ds_kd": {"segment_ids_trained": false}`` (see :mod:`ds_kd.models.modeldir`)."""
    from ds_kd.schema import config_special_ids

    if model.config.pad_token_id != special_ids["pad"]:
        log.warning("the model was built with pad id %d but its tokenizer pads with %d: the export says %d",
                    model.config.pad_token_id, special_ids["pad"], special_ids["pad"])
    state = dist.gather_full_state_dict(model, optimizer)
    if dist.is_main():
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state, special_token_ids=config_special_ids(special_ids))
        record(tmp, segment_ids_trained=False)  # training passes no token types: row 1 never learns
        for f in tokenizer_dir.iterdir():
            if f.is_file() and f.name != "manifest.json" and not (tmp / f.name).exists():  # never the model's files
                shutil.copy2(f, tmp / f.name)
        # tokenizer.json stays byte-identical (its hash ties it to the shards); the length is the model's
        make_portable(tmp, merges=False, model_max_length=model.config.max_position_embeddings)
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
    shards directory and a digest of its manifest), the DeepSpeed JSON after the overrides, with its batch
    settings reduced to the global batch (micro batch x accumulation x ranks: a run may resume on other ranks
    with the same global batch), the budget, the optimisation and data-order flags. Not: logging, checkpoint
    cadence, W&B, DataLoader workers, paths of the output. The stage adds its model (and teacher and losses)."""
    from ds_kd.train.engine import apply_overrides, load_ds_config

    data = Path(cfg.data)
    shard_dir = data / "shards" if (data / "shards").is_dir() else data
    manifest = shard_dir / "manifest.json"
    engine = apply_overrides(load_ds_config(cfg.deepspeed_config), cfg.ds_overrides)
    micro = engine.pop("train_micro_batch_size_per_gpu", None)
    accumulation = engine.pop("gradient_accumulation_steps", 1)
    total = engine.pop("train_batch_size", None)
    global_batch = total or (micro or 0) * accumulation * int(os.environ.get("WORLD_SIZE", "1"))
    names = ("max_steps", "epochs", "optimizer", "lr", "weight_decay", "warmup_steps", "warmup_ratio", "decay",
             "max_len", "packing", "shuffle_window", "seed", "init_from", "init_layers")
    return {"data": str(shard_dir.resolve()),
            "data_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
            "tokenizer": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None,
            "deepspeed_config": engine, "global_batch": global_batch, **{n: getattr(cfg, n) for n in names},
            **({"lang_mix": cfg.lang_mix} if cfg.lang_mix != "corpus" else {})}  # runs from before it still match


def plan_out(cfg: TrainConfig, what: str, settings: dict) -> str:
    """What to do with ``cfg.out`` (``ds_kd.manifest.rerun_action``'s rule): start, skip, overwrite, resume or
    extend; raises naming the settings that differ. Checks the flags first, so a bad command line fails
    before any work."""
    check_train_flags(cfg)
    out = Path(cfg.out)
    finished = has_manifest(out)
    recorded = (read_manifest(out).get("settings") if finished
                else read_json_file(out / SETTINGS_JSON))
    unfinished = checkpoint.latest_tag(out / "checkpoints") is not None
    if (finished or unfinished) and recorded is not None and not cfg.overwrite:
        check_global_batch(cfg, what, recorded, settings)
    action = rerun_action(out, what, recorded, settings, finished=finished,
                          unfinished=unfinished, overwrite=cfg.overwrite,
                          resume=cfg.resume)
    if action == "skip":
        log.info("%s/manifest.json: %s already finished with the same settings: skipping (--overwrite runs it "
                 "again)", out, what)
    elif action in ("extend", "overwrite"):
        log.info("%s: %s", out, "extending the finished run to the new budget" if action == "extend"
                 else "--overwrite: starting over")
    return action


def check_global_batch(cfg: TrainConfig, what: str, recorded: dict, settings: dict) -> None:
    """Refuse, in one line, a command whose global batch (micro batch x accumulation x ranks) is not the one
    ``cfg.out``'s run recorded (a resume or extension on fewer ranks with the same JSON): the data position and
    the learning-rate schedule count global batches. The message gives the overrides that keep it
    (:func:`ds_kd.train.checkpoint.keep_global_batch`) and the other settings that differ."""
    from ds_kd.train.engine import apply_overrides, load_ds_config

    old, new = recorded.get("global_batch"), settings["global_batch"]
    if old is None or old == new:
        return
    engine = apply_overrides(load_ds_config(cfg.deepspeed_config), cfg.ds_overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = int(engine.get("train_micro_batch_size_per_gpu") or max(1, new // world))
    others = {key: diff for key, diff in settings_differences({**recorded, "global_batch": new}, settings).items()
              if key.split(".")[0] not in BUDGET_KEYS}  # a budget may change on --resume
    also = f"; other settings differ too ({describe_differences(others)})" if others else ""
    raise UsageError(f"{cfg.out} holds a {what} trained with a global batch of {old} sequences (micro batch x "
                     f"accumulation x ranks), this command's is {new} ({world} ranks x micro batch {micro} x "
                     f"accumulation {engine.get('gradient_accumulation_steps', 1)}); the data position and the "
                     f"learning-rate schedule count global batches: keep {old} with "
                     f"{checkpoint.keep_global_batch(old, world, micro)}, or pass --overwrite to start over with "
                     f"{new}{also}")


def skipped_result(cfg: TrainConfig) -> RunResult:
    m = read_manifest(cfg.out)
    return RunResult(Path(cfg.out), m["steps"], [], m["val"], Path(cfg.out) / "export", skipped=True)


def prepare_out(out: Path, action: str, settings: dict) -> None:
    """Rank 0, before training: clear the old run (overwrite) and record the settings of the run about to train.
    An extended run keeps its manifest and export until the new ones replace them: a crash midway leaves the
    finished run as it was, and ``--resume`` with the larger budget continues from the newest checkpoint."""
    if action == "overwrite":
        remove_outputs(out, RUN_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_JSON, json.dumps(_jsonable(settings), indent=2) + "\n")


@dataclass
class Job:
    """What a stage trains, built once the process group and the checked DeepSpeed config exist."""

    model: torch.nn.Module
    """What the engine trains (a BertForMaskedLM, or a Distiller holding teacher and student)."""
    step: StepFn
    """One micro-batch's loss (see :data:`ds_kd.train.loop.StepFn`)."""
    mlm_model: BertForMaskedLM
    """What is validated (MLM perplexity) and exported: ``model`` itself or the student inside it."""
    manifest: dict
    """The stage's fields of ``manifest.json`` (model, config, initialisation, ...)."""
    final_check: Callable[[], dict] | None = None
    """Runs on every rank after training, before the manifest; may raise, or return more manifest fields."""
    identity: dict | None = None
    """Facts about inputs that no checkpoint holds (the teacher's digest): stored in every checkpoint, and a
    resume under other values is refused before the first step."""
    perplexity: bool = True
    """Validate MLM perplexity; False when no loss trains ``mlm_model``'s MLM head (its perplexity would say
    nothing): the manifest's ``val`` is then empty."""


@dataclass
class StagePlan:
    """A stage's answer to :func:`run_stage` once the data is known, before any distributed work."""

    models: dict[str, BertConfig]
    """The configs whose position tables must hold ``--max-len`` (name -> config, the name used in the error)."""
    build: Callable[[EngineSetup], Job]
    """Builds the model and its step; called on every rank after the process group exists, with the global
    RNGs seeded identically (``cfg.seed``), so every rank builds the same initial weights."""


def run_stage(cfg: TrainConfig, stage: str, what: str, stage_settings: dict,
              plan: Callable[[CorpusData], StagePlan], shape: str) -> RunResult:
    """Run one training stage (``stage``: the manifest's stage name, e.g. "pretrain"; ``what``: its name in
    messages, e.g. "pretraining") from the command line's ``cfg`` to the manifest.

    ``stage_settings`` joins :func:`train_settings` in what a re-run compares. ``plan(data)`` checks the stage's
    own inputs (raising ValueError or FileNotFoundError naming the flag or file) and returns the
    :class:`StagePlan`. ``shape`` (a preset, config file or checkpoint directory) gives the default peak rate
    (:func:`ds_kd.models.model.default_lr`), recorded as the ``lr`` setting where it applies. Everything that can be
    refused is refused before the process group, the run directory or any weights exist."""
    lr = default_lr(shape) if cfg.lr is None else None
    settings = {**train_settings(cfg), **stage_settings, **({"lr": lr} if lr is not None else {})}
    action = plan_out(cfg, what, settings)
    if action == "skip":
        return skipped_result(cfg)
    data = resolve_data(cfg.data, cfg.tokenizer)
    stage_plan = plan(data)
    check_max_len(cfg.max_len, **stage_plan.models)
    dist.init_distributed(cfg.dist_timeout_minutes)
    setup = build_ds_config(cfg, lr)  # checked with the real world size, before the run directory exists
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # identical initial weights on every rank; dropout is seeded per micro-batch
    return run_training(cfg, stage_plan.build(setup), data, setup, stage, settings, action)
