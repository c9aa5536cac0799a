"""Resumable DeepSpeed checkpoints: an atomic ``latest`` pointer, the last K kept, and resume on another number
of ranks (and nodes, and DataLoader workers) through DeepSpeed's universal checkpoints.

Layout under ``<run>/checkpoints/``::

    step00000100/                 engine.save_checkpoint (model, optimizer, scheduler; frozen params excluded)
    step00000100/run_state.json   written by rank 0: the step, the saving run's engine settings and the reader's
                                  position (a few integers: the same for every topology)
    latest                        the tag of the newest complete checkpoint (written last, by rename)
    universal/step00000100/       made on a resume with another number of ranks (``ds_to_universal``) and
                                  loaded with ``checkpoint.load_universal``; removed at the next save

``latest`` moves only after every rank has finished writing, so a crash in the middle of a save leaves it on
the previous, complete checkpoint.

**What may change across a resume** (checked by :func:`plan_resume` before the engine is built):

- the number of ranks and nodes: a ZeRO checkpoint holds one optimizer partition per rank, so on another
  number of ranks the checkpoint is first converted to DeepSpeed's universal format (one file per parameter
  and state) with ``python -m deepspeed.checkpoint.ds_to_universal``, run here by rank 0 while the other ranks
  wait for its result on the file system (not in a collective, which would time out), and loaded with
  ``{"checkpoint": {"load_universal": true}}``; model, optimizer (fp32 master weights, moments, step) and
  LR scheduler come back;
- the DataLoader workers per rank and the micro batch per rank, as long as the global batch stays;
- not the **global batch** (micro batch x accumulation x ranks): the data position is counted in global
  batches of sentences (optimizer step k trains sentences [kG, (k+1)G) of the stream) and the learning-rate
  schedule in optimizer steps, so a different G would change both. Keep it by trading ranks for
  accumulation, e.g. 2 ranks x 8 x 1 -> 1 rank x 8 x 2 (``--ds-override gradient_accumulation_steps=2``);
- not the ZeRO stage (DeepSpeed 0.19.8 loads a stage-2 universal checkpoint only into stage 1/2 and a stage-3
  one only into stage 3: its loader looks for the saving stage's files), the precision (the optimizer state is
  laid out and named per precision) or the optimizer (other state).

**Random state.** Dropout is seeded per micro-batch from the data position (see :mod:`ds_kd.data.reader`), masks
per sentence: no per-rank random state is needed to resume, so a changed world size reproduces them too.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_kd.train import engine as dist
from ds_kd.errors import UsageError
from ds_kd.manifest import atomic_write_text

log = logging.getLogger("ds_kd")

LATEST = "latest"
RUN_STATE = "run_state.json"
UNIVERSAL = "universal"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag or None


def save(engine, ckpt_dir: Path, step: int, extras: dict, keep_last: int) -> str:
    """Save on every rank; rank 0 writes ``extras`` (the reader's position; JSON) with the engine settings."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    if dist.is_main():
        state = {"step": step, "engine": dist.engine_settings(engine), "optimizer": optimizer_name(engine), **extras}
        atomic_write_text(ckpt_dir / tag / RUN_STATE, json.dumps(state, indent=1) + "\n")
    dist.barrier()  # every rank's files are complete before the pointer moves
    if dist.is_main():
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep_last, keep=tag)
        shutil.rmtree(ckpt_dir / UNIVERSAL, ignore_errors=True)  # derived from an older checkpoint
    dist.barrier()
    return tag


def optimizer_name(engine) -> str:
    """The class of the optimizer inside the engine's ZeRO wrapper (``AdamW``, ``Lamb``)."""
    return type(base_optimizer(engine)).__name__


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old != keep:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


@dataclass
class ResumePlan:
    """How to resume: from which checkpoint, and whether through a universal checkpoint."""

    ckpt_dir: Path
    tag: str
    state: dict
    """The saving run's ``run_state.json``: step, engine settings, optimizer, reader position."""
    universal: bool
    """The number of ranks changed: load the universal conversion of the checkpoint."""

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def load_dir(self) -> Path:
        return self.ckpt_dir / UNIVERSAL if self.universal else self.ckpt_dir


def batch_settings(ds_config: dict) -> dict:
    """ZeRO stage, micro batch, accumulation and global batch that DeepSpeed will derive from ``ds_config`` on
    this process group (its own rules, before any engine exists)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    resolved = DeepSpeedConfig(dict(ds_config))
    return {"zero_stage": int(resolved.zero_optimization_stage), "world_size": dist.world_size(),
            "micro_batch_per_rank": resolved.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": resolved.gradient_accumulation_steps,
            "global_batch": resolved.train_batch_size,
            "precision": str(dist.precision_dtype(ds_config)).replace("torch.float16", "fp16")
            .replace("torch.bfloat16", "bf16").replace("torch.float32", "fp32")}


def plan_resume(ckpt_dir: Path, ds_config: dict, optimizer: str) -> ResumePlan | None:
    """Check, before the engine is built, that the newest checkpoint can be resumed with ``ds_config`` on this
    process group; None when there is no checkpoint. Raises ValueError saying why not and how to fix it."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    state_file = ckpt_dir / tag / RUN_STATE
    if not state_file.is_file():
        raise UsageError(f"{state_file} is missing: checkpoint {tag} was written by an older version of this code "
                         f"(per-rank reader positions), which this version cannot resume exactly; start a new --out")
    state = json.loads(state_file.read_text())
    saved, now = state["engine"], batch_settings(ds_config)
    refuse_changes(ckpt_dir / tag, saved, now, state.get("optimizer"), optimizer)
    plan = ResumePlan(ckpt_dir, tag, state, universal=saved["world_size"] != now["world_size"])
    if plan.universal:
        log.info("checkpoint %s was written by %d ranks, resuming on %d: loading it as a universal checkpoint",
                 tag, saved["world_size"], now["world_size"])
    return plan


def keep_global_batch(global_batch: int, world_size: int, micro_batch: int) -> str:
    """The ``--ds-override`` flags that give ``global_batch`` on ``world_size`` ranks: the accumulation for
    ``micro_batch``, else a micro batch of its own with accumulation 1, else a sentence saying what is needed."""
    if global_batch % (world_size * micro_batch) == 0:
        return f"--ds-override gradient_accumulation_steps={global_batch // (world_size * micro_batch)}"
    if global_batch % world_size == 0:
        return (f"--ds-override train_micro_batch_size_per_gpu={global_batch // world_size} "
                f"--ds-override gradient_accumulation_steps=1")
    return f"a micro batch and accumulation whose product with the {world_size} ranks is {global_batch}"


def refuse_changes(where: Path, saved: dict, now: dict, saved_optimizer: str | None, optimizer: str) -> None:
    """Raise ValueError for a change of global batch, ZeRO stage, precision or optimizer (see the module doc)."""
    def layout(s: dict) -> str:
        return (f"{s['world_size']} ranks x micro batch {s['micro_batch_per_rank']} x accumulation "
                f"{s['gradient_accumulation_steps']} = {s['global_batch']}")

    if saved["global_batch"] != now["global_batch"]:
        hint = keep_global_batch(saved["global_batch"], now["world_size"], now["micro_batch_per_rank"])
        raise UsageError(f"{where}: written with a global batch of {layout(saved)} sequences (sentences, or packed "
                         f"rows), this run's is "
                         f"{layout(now)}. The data position and the learning-rate schedule count global batches, "
                         f"so it must stay {saved['global_batch']}: e.g. {hint}")
    if saved["zero_stage"] != now["zero_stage"]:
        raise UsageError(f"{where}: written under ZeRO stage {saved['zero_stage']}, this run uses stage "
                         f"{now['zero_stage']}; DeepSpeed loads a checkpoint (also a universal one) only into the "
                         f"stage that wrote it: --ds-override zero_optimization.stage={saved['zero_stage']}")
    if saved["precision"] != now["precision"]:
        raise UsageError(f"{where}: written in {saved['precision']}, this run trains in {now['precision']}; the "
                         f"optimizer state is laid out per precision: resume in {saved['precision']} "
                         f"(--ds-override {saved['precision']}.enabled=true and the other off)")
    if saved_optimizer is not None and saved_optimizer != optimizer:
        raise UsageError(f"{where}: written with the {saved_optimizer} optimizer, this run uses {optimizer}: "
                         f"resume with the same --optimizer")


def universal_command(ckpt_dir: Path, tag: str, output: Path) -> list[str]:
    """The command that converts checkpoint ``tag`` to a universal checkpoint in ``output``."""
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
            "--output_folder", str(output), "--inject_missing_state", "--num_extract_workers", "2",
            "--num_merge_workers", "1"]


def prepare(plan: ResumePlan, ds_config: dict, wait_minutes: float) -> dict:
    """Make what loading ``plan`` needs before the engine is built; returns the DeepSpeed config to build it with.

    For a universal resume, rank 0 converts the checkpoint (once; a finished conversion is reused; see
    :func:`convert`) and the config gets ``checkpoint.load_universal``. The other ranks wait for the converted
    checkpoint's ``run_state.json`` on the shared file system, not in a collective: a collective fails after the
    process group's timeout (``--dist-timeout-minutes``), shorter than the conversion of a large checkpoint.
    They wait at most ``wait_minutes`` (``--convert-timeout-minutes``), then raise TimeoutError naming it."""
    if not plan.universal:
        return ds_config
    target = plan.ckpt_dir / UNIVERSAL / plan.tag
    if dist.is_main():
        if not (target / RUN_STATE).is_file():
            convert(plan, target)
    else:
        wait_for_conversion(target, wait_minutes)
    from ds_kd.train.engine import apply_overrides

    return apply_overrides(ds_config, {"checkpoint.load_universal": True})


PROGRESS_SECONDS = 60.0
"""How often rank 0 logs that a conversion is still running."""


def convert(plan: ResumePlan, target: Path) -> None:
    """Rank 0: convert ``plan``'s checkpoint into ``target`` (written beside it, then renamed; its
    ``run_state.json`` marks it complete), logging progress; the converter's output goes to ``<target>.log``.
    Raises RuntimeError with the end of that output when the converter fails."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    output = target.with_name(target.name + ".log")
    command = universal_command(plan.ckpt_dir, plan.tag, tmp)
    log.info("converting to a universal checkpoint (the other ranks wait for %s; output in %s): %s",
             target / RUN_STATE, output, " ".join(command))
    start = time.monotonic()
    with open(output, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            try:
                proc.wait(timeout=PROGRESS_SECONDS)
                break
            except subprocess.TimeoutExpired:
                log.info("still converting %s to a universal checkpoint: %.0f s so far (output in %s)",
                         plan.ckpt_dir / plan.tag, time.monotonic() - start, output)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {plan.ckpt_dir / plan.tag} to a universal checkpoint failed (exit "
                           f"{proc.returncode}):\n{output.read_text()[-3000:]}\nthe command was: {' '.join(command)}")
    shutil.copy2(plan.ckpt_dir / plan.tag / RUN_STATE, tmp / RUN_STATE)  # marks the conversion complete
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("converted %s to a universal checkpoint in %.0f s", plan.ckpt_dir / plan.tag, time.monotonic() - start)


def wait_for_conversion(target: Path, wait_minutes: float, poll_seconds: float = 1.0) -> None:
    """A rank other than 0: wait until rank 0's conversion into ``target`` is complete; raise TimeoutError
    after ``wait_minutes``."""
    deadline = time.monotonic() + 60 * wait_minutes
    while not (target / RUN_STATE).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {dist.rank()}: {target / RUN_STATE} did not appear within "
                               f"--convert-timeout-minutes {wait_minutes:g} while rank 0 converts the checkpoint to "
                               f"a universal one: see rank 0's log and {target}.log; give a larger "
                               f"--convert-timeout-minutes if it is only slow, and keep {target.parent} on a file "
                               f"system every node shares")
        time.sleep(poll_seconds)


def load(engine, plan: ResumePlan) -> dict:
    """Restore model, optimizer and scheduler from ``plan`` into ``engine``; returns the saved run state (with
    ``step`` and the reader's position)."""
    groups = param_group_settings(engine)
    load_path, _ = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"{plan.load_dir / plan.tag}: DeepSpeed could not load this checkpoint")
    if plan.universal and engine.zero_optimization_stage() == 3:
        repair_zero3_universal(base_optimizer(engine), groups)
    return plan.state


def repair_zero3_universal(optimizer, groups: list[dict]) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader, which would make the resumed run differ.

    It gives every parameter group the hyperparameters of the first (so biases and LayerNorm would get the
    matrices' weight decay): each group gets its own back (``groups``; the learning rate, one schedule for all
    groups, stays as loaded). And it gives every group's state one shared ``step`` tensor, which torch's Adam
    increments in place once per group: each state gets its own copy."""
    for group, own in zip(optimizer.param_groups, groups):
        group.update(own)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def param_group_settings(engine) -> list[dict]:
    """Each parameter group's hyperparameters other than its parameters and learning rate."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
            for group in base_optimizer(engine).param_groups]
