"""What a fine-tuning job leaves in its directory besides ``result.json``: settings, per-epoch checkpoints.

    <out>/checkpoint/settings.json        the settings of the job in progress (compared by ``--resume``)
    <out>/checkpoint/last.pt              after every epoch: weights, optimizer, schedule, data order and RNG
                                          states, dev history and best epoch, so ``--resume`` continues exactly
    <out>/checkpoint/best-epoch<N>/       the best epoch so far as a task model (``load_task_model`` reads it)

The checkpoint goes once ``result.json`` is written (a finished job keeps only its result, and ``model/`` with
``--save-model``): a grid of real encoders would otherwise keep gigabytes of optimizer state per job.

Re-running into a directory follows ``ds_kd.manifest.rerun_action``: a finished job with the same settings is
skipped, other settings are refused naming what differs unless ``overwrite``; an unfinished one (a checkpoint
and no result) continues with ``resume``. A finished job is not extended (its checkpoint is gone).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ds_kd.manifest import atomic_write_text, read_json_file, remove_outputs, rerun_action

CHECKPOINT = "checkpoint"
LAST = "last.pt"
SETTINGS = "settings.json"
NOT_SETTINGS = ("out", "device", "eval_batch_size", "threads", "resume", "overwrite")
"""FinetuneConfig fields that do not change a job's result (where it goes, how fast it runs)."""
JOB_OUTPUTS = ("result.json", "model", "distill.json", CHECKPOINT)


def job_settings(cfg, extra: dict | None = None) -> dict:
    """What determines a job's result: the ``FinetuneConfig`` fields but :data:`NOT_SETTINGS`, with the model
    and data as absolute paths and a digest of the task's data manifest; ``extra`` adds e.g. ft-distill's
    teacher and loss weights."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    manifest = Path(cfg.data) / cfg.task / "manifest.json"
    settings.update(model=str(Path(cfg.model).resolve()), data=str(Path(cfg.data).resolve()),
                    data_manifest_sha256=hashlib.sha256(manifest.read_bytes()).hexdigest()
                    if manifest.is_file() else None)
    return {**settings, **(extra or {})}


def check_out(cfg, settings: dict, what: str = "fine-tuning job") -> dict | None:
    """Apply the re-run rule to ``cfg.out``: the saved ``result.json`` (as a dict) when the job already finished
    with these settings; None when it is to run (after clearing the old outputs with ``cfg.overwrite``).
    Raises FileExistsError naming the settings that differ."""
    out = Path(cfg.out)
    result_path, ckpt = out / "result.json", out / CHECKPOINT
    finished = result_path.is_file()
    saved = json.loads(result_path.read_text(encoding="utf-8")) if finished else None
    recorded = saved.get("settings") if finished else read_json_file(ckpt / SETTINGS)
    action = rerun_action(out, what, recorded, settings, finished=finished, unfinished=(ckpt / LAST).is_file(),
                          overwrite=cfg.overwrite, resume=cfg.resume, can_extend=False)
    if action == "skip":
        print(f"[finetune] {result_path} holds a finished job with the same settings: skipped (--overwrite runs "
              f"it again)", flush=True)
        return saved
    if action == "overwrite":
        remove_outputs(out, JOB_OUTPUTS)
    if action == "resume":
        print(f"[finetune] {out}: resuming the unfinished job from {ckpt / LAST}", flush=True)
    return None


def save(out: Path, settings: dict, epoch: int, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
         extra: list[nn.Parameter], progress: dict, best_model_dir=None) -> None:
    """Checkpoint after ``epoch``: ``best_model_dir(path)`` writes the best task model when this epoch is the
    new best; ``progress`` holds the dev history and the best epoch and score. Each file is complete before
    ``last.pt`` points at it, so a kill at any moment leaves the previous checkpoint usable."""
    ckpt = out / CHECKPOINT
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt / SETTINGS, json.dumps(settings, indent=2, default=str) + "\n")
    if best_model_dir is not None:
        best_model_dir(ckpt / f"best-epoch{epoch}")
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
             "extra": [p.detach().cpu() for p in extra], **progress}
    tmp = ckpt / (LAST + ".tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt / LAST)
    for old in ckpt.glob("best-epoch*"):
        if old.name != f"best-epoch{progress['best_epoch']}":
            shutil.rmtree(old, ignore_errors=True)


def load(out: Path, model: nn.Module, optimizer, scheduler, generator: torch.Generator,
         extra: list[nn.Parameter]) -> dict | None:
    """Restore the last checkpoint into the given objects; returns its progress (``epoch``, ``history``,
    ``best_epoch``, ``best_score``, ``best_state``) or None when there is none."""
    from safetensors.torch import load_file

    path = out / CHECKPOINT / LAST
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # The schedule's length stays this run's (a resumed job may have another --epochs); the step count is restored.
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    with torch.no_grad():
        for p, saved in zip(extra, state["extra"]):
            p.copy_(saved)
    best = out / CHECKPOINT / f"best-epoch{state['best_epoch']}" / "task_model.safetensors"
    return {"epoch": state["epoch"], "history": state["history"], "best_epoch": state["best_epoch"],
            "best_score": state["best_score"], "best_state": load_file(str(best))}


def remove(out: Path) -> None:
    """Drop the checkpoint of a finished job."""
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
