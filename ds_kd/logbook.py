"""Metrics on global rank 0 only: Weights & Biases, a local JSONL, a console metric line, a progress bar (on a
terminal only) and a PNG of the curves.

W&B settings come from flags or the usual environment (``WANDB_PROJECT``, ``WANDB_NAME``, ``WANDB_RUN_GROUP``,
``WANDB_MODE``). With no API key (``WANDB_API_KEY`` or a ``wandb login``) the run is kept offline in
``<run>/wandb`` for a later ``wandb sync``; ``WANDB_MODE=disabled`` turns it off (the tests do).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ds_kd")
WANDB_ID_FILE = "wandb_run_id"


@dataclass
class WandbConfig:
    project: str | None = None
    """W&B project (default: $WANDB_PROJECT or 'ds-kd')."""
    name: str | None = None
    """Run name (default: $WANDB_NAME or the run directory's name)."""
    group: str | None = None
    """Run group (default: $WANDB_RUN_GROUP), e.g. one group per experiment."""
    mode: str | None = None
    """online, offline or disabled (default: $WANDB_MODE, else offline when no API key is found)."""


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_mode(cfg: WandbConfig, default: str) -> str:
    """The W&B mode: ``cfg.mode``, else ``$WANDB_MODE`` (empty counts as unset), else ``default``."""
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # wandb rejects an empty mode; empty means unset
    return cfg.mode or os.environ.get("WANDB_MODE") or default


def start_wandb(run_dir: Path, cfg: WandbConfig, config: dict, default_mode: str, job_type: str | None = None):
    """A W&B run kept in ``run_dir/wandb`` (None when the mode is disabled). Its id is stored in
    ``run_dir/wandb_run_id``, so a resumed or re-run stage continues the same W&B run."""
    mode = wandb_mode(cfg, default_mode)
    if mode == "disabled":
        return None
    import wandb

    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    run = wandb.init(project=cfg.project or os.environ.get("WANDB_PROJECT", "ds-kd"),
                     name=cfg.name or os.environ.get("WANDB_NAME", Path(run_dir).resolve().name),
                     group=cfg.group or os.environ.get("WANDB_RUN_GROUP"), job_type=job_type,
                     dir=str(run_dir), mode=mode, config=config, id=run_id, resume="allow")
    log.info("W&B run %s (mode %s)", run.name, mode)
    return run


@dataclass
class ResultTable:
    """One table of results for W&B: ``rows`` of values in the order of ``columns``."""

    columns: list[str]
    rows: list[list]


def log_results(run_dir: Path, cfg: WandbConfig, job_type: str, config: dict, tables: dict[str, ResultTable],
                summary: dict | None = None, images: dict[str, Path] | None = None,
                artifact: tuple[str, list[Path]] | None = None) -> bool:
    """Log finished results (not a training curve) to a W&B run of ``run_dir``: each of ``tables`` as a
    ``wandb.Table`` under its key, ``summary`` values, ``images`` (PNG paths) and an ``artifact`` (name, files)
    of ``job_type``. W&B is off unless ``cfg.mode`` or ``$WANDB_MODE`` turns it on (a grid would otherwise start a
    W&B process for nothing). Returns whether anything was logged."""
    run = start_wandb(run_dir, cfg, config, "disabled", job_type)
    if run is None:
        return False
    import wandb

    try:
        run.log({key: wandb.Table(columns=t.columns, data=t.rows) for key, t in tables.items()}
                | {key: wandb.Image(str(path)) for key, path in (images or {}).items()})
        run.summary.update(summary or {})
        if artifact is not None:
            name, files = artifact
            art = wandb.Artifact(name, type=job_type)
            for path in files:
                art.add_file(str(path))
            run.log_artifact(art)
    finally:
        run.finish()
    return True


class Logbook:
    """Writes metrics keyed by optimizer step. On ranks other than 0 every method does nothing.

    When stderr is a terminal a progress bar is drawn there, and log lines (ours and DeepSpeed's) are written
    above it through ``tqdm.write`` rather than onto it; otherwise (a pipe, a file: the launcher's case) there
    is no bar and the metric lines of :meth:`log_train` are the progress."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_cfg: WandbConfig, run_config: dict,
                 total_steps: int, initial_step: int = 0, elapsed_before: float = 0.0):
        """``elapsed_before``: seconds the run had trained before this process (restored from a checkpoint),
        so ``elapsed_s`` counts the whole run over resumes."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.wandb_run = None
        self.bar = None
        self.redirect = contextlib.ExitStack()
        self.started = time.time() - elapsed_before
        if not enabled:
            return
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        default_mode = "online" if _has_wandb_key() else "offline"
        self.wandb_run = start_wandb(self.run_dir, wandb_cfg, run_config, default_mode)
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            desc=self.run_dir.name, file=sys.stderr)
            self.redirect.enter_context(logging_redirect_tqdm([logging.root, logging.getLogger("DeepSpeed")]))

    def elapsed(self) -> float:
        """Seconds since the run first started, over resumes."""
        return time.time() - self.started

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One ``metrics.jsonl`` row (with wall-clock ``time`` and ``elapsed_s``); in W&B grouped as
        ``train/...`` and ``val/...`` at history step ``step``: a resumed process continues the run's history at
        its checkpoint's step (offline too, where W&B itself cannot tell that a run resumes and would count
        from 0 again), and W&B drops steps below those the run already has."""
        if not self.enabled:
            return
        record = {"optimizer_step": step, **{k: float(v) for k, v in metrics.items()},
                  "time": round(time.time(), 3), "elapsed_s": round(self.elapsed(), 3)}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({"optimizer_step": step, **{wandb_key(k): v for k, v in record.items()
                                                           if k != "optimizer_step"}}, step=step)

    def log_train(self, step: int, metrics: dict[str, float], fp16: bool = False) -> None:
        """:meth:`log`, and the metrics as one console line (:func:`metric_line`)."""
        self.log(step, metrics)
        if self.enabled:
            log.info("%s", metric_line(step, self.total_steps, metrics, fp16))

    def advance(self, step: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.redirect.close()
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        if self.wandb_run is not None:
            self.wandb_run.finish()


def metric_line(step: int, total_steps: int, m: dict[str, float], fp16: bool = False) -> str:
    """The training metrics of :func:`ds_kd.train.loop.train` as one line, e.g. ``step 40/1000 (epoch 0.213) | loss
    5.61 (mlm 5.61) | ppl 273 | lr 1.00e-04 | grad norm 1.84 | 52,310 tokens/s | 410.2 sentences/s | 0.61 s/step,
    eta 0:09:46``, with ``loss scale 65536 | 2 skipped steps`` when ``fp16`` (a loss scaler runs). The eta is
    the steps left at the window's seconds per step. Omits what ``m`` lacks: the epoch (``epoch``) and the
    perplexity (``train_ppl``, logged where an MLM loss exists)."""
    terms = ", ".join(f"{k[len('loss_'):]} {v:.4g}" for k, v in sorted(m.items())
                      if k.startswith("loss_") and k != "loss_scale")
    parts = [f"step {step}/{total_steps}" + (f" (epoch {m['epoch']:.3f})" if "epoch" in m else ""),
             f"loss {m['loss']:.4g}" + (f" ({terms})" if terms else "")]
    if "train_ppl" in m:
        parts.append(f"ppl {m['train_ppl']:.4g}")
    eta = datetime.timedelta(seconds=round(m["seconds_per_step"] * (total_steps - step)))
    parts += [f"lr {m['lr']:.2e}", f"grad norm {m['grad_norm']:.3g}", f"{m['tokens_per_s']:,.0f} tokens/s",
              f"{m['sentences_per_s']:,.1f} sentences/s", f"{m['seconds_per_step']:.3g} s/step, eta {eta}"]
    if fp16:
        parts.append(f"loss scale {m['loss_scale']:g} | {m['skipped_steps']:.0f} skipped steps")
    return " | ".join(parts)


def wandb_key(name: str) -> str:
    """``val_ppl_fr`` -> ``val/ppl_fr``; training metrics -> ``train/<name>``; times -> ``time/<name>``."""
    if name.startswith("val_"):
        return "val/" + name[len("val_"):]
    if name in ("time", "elapsed_s"):
        return "time/" + name
    return "train/" + name


def read_metrics(path: Path) -> list[dict]:
    """The JSONL records; a step logged twice (a resumed run repeats steps after its checkpoint) keeps the last."""
    by_key: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_key[(rec["optimizer_step"], tuple(sorted(rec)))] = rec
    return sorted(by_key.values(), key=lambda r: r["optimizer_step"])


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss and perplexity, and validation perplexity, against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_ppl" in r]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["optimizer_step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (total)")
        for key in sorted({k for r in train for k in r if k.startswith("loss_") and k != "loss_scale"}):
            ax_loss.plot(steps, [r.get(key, math.nan) for r in train], label=key, alpha=0.7)
        ax_ppl.plot(steps, [r.get("train_ppl", math.nan) for r in train], label="train MLM perplexity")
    if val:
        ax_ppl.plot([r["optimizer_step"] for r in val], [r["val_ppl"] for r in val], "o-", label="val perplexity")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_ppl.set(xlabel="optimizer step", ylabel="perplexity", title="MLM perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
