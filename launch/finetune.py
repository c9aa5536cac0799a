"""Fine-tune one encoder on one task's English data and test it zero-shot on every language (paper §4).

    python launch/finetune.py --model DIR --task xnli --data DATA --seed 1 --out runs/xnli/mLeanBERT/1
    python launch/finetune.py --model STUDENT --teacher TASK_TEACHER --sparse-density 0.08 --full-epochs 3 ...
        # BiStil's phase 2: lottery-ticket sparse fine-tuning with task distillation from the fine-tuned teacher

Writes OUT/result.json (scores per language, zero-shot averages, configuration, settings, time). OUT/checkpoint/
holds the last epoch (for --resume after a kill) and the best epoch so far as a task model until the job
finishes. OUT holding a finished job with the same settings: skipped; with other settings: refused, naming
them (--overwrite starts over). A model directory without its tokenizer files is refused. Exit status 2 on
such errors.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from ds_kd.cli import RESULTS_WANDB_HELP, add_wandb_flags, wandb_config
from ds_kd.errors import UsageError
from ds_kd.finetune.config import FinetuneConfig
from ds_kd.cli.flags import HelpFormatter, field_doc
from ds_kd.data.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    """One flag per FinetuneConfig field, its docstring as help (the formatter adds the default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    required = {"model", "task", "data", "out"}
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        doc = field_doc(FinetuneConfig, f.name)
        if f.name == "task":
            p.add_argument(flag, required=True, metavar="TASK",
                           help=f"{doc} ({', '.join(sorted(TASKS))}, or a task of one's own under --data)")
        elif f.type in ("bool",) and f.name == "bf16":
            p.add_argument("--no-bf16", dest="bf16", action="store_false", help="Run CUDA in fp32. " + doc)
        elif f.type == "bool":
            p.add_argument(flag, action="store_true", help=doc)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            p.add_argument(flag, type=kind, required=f.name in required,
                           default=None if f.name in required else f.default, help=doc)
    g = p.add_argument_group("task distillation and lottery-ticket sparse fine-tuning (BiStil's phase 2)")
    g.add_argument("--teacher", default=None,
                   help="a task model fine-tuned on this task (a job saved with --save-model): distil it into the "
                        "model with the loss of --distill-loss (default: none, plain fine-tuning)")
    g.add_argument("--distill-loss", choices=("bistil", "tinybert"), default="bistil",
                   help="the loss with --teacher: bistil (soft cross-entropy at --temperature, hidden-state MSE with "
                        "the embeddings, attention-probability MSE, averaged over layers; --task-weight for the "
                        "labels) or tinybert (the grid's ft-distill rows, the paper's: hard labels, soft "
                        "cross-entropy at temperature 1, embedding, hidden-state and attention-score MSE summed over "
                        "the layer map; --temperature and --task-weight do not apply)")
    g.add_argument("--temperature", type=float, default=None,
                   help="soft cross-entropy temperature with --teacher --distill-loss bistil (default: 2.0)")
    g.add_argument("--task-weight", type=float, default=None,
                   help="weight of the hard-label task loss beside the teacher's terms with --distill-loss bistil "
                        "(default: 0, off)")
    g.add_argument("--sparse-density", type=float, default=None,
                   help="LT-SFT: fine-tune fully for --full-epochs, keep this share of the body's weights that moved "
                        "most, reset and fine-tune only those for --epochs (BiStil: 0.08) (default: dense)")
    g.add_argument("--full-epochs", type=int, default=3, help="LT-SFT's full fine-tuning epochs (phase A)")
    add_wandb_flags(p.add_argument_group("Weights & Biases: the job's results as tables"), RESULTS_WANDB_HELP)
    return p


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    return parse_all(argv)[0]


def parse_all(argv: list[str] | None = None):
    """(FinetuneConfig, WandbConfig) of the command line."""
    return parse_job(argv)[:2]


def parse_job(argv: list[str] | None = None):
    """(FinetuneConfig, WandbConfig, the job to run: cfg -> FinetuneResult) of the command line."""
    args = build_parser().parse_args(argv)
    wandb = wandb_config(args)
    names = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names}), wandb, job_runner(args)


def distill_losses(args: argparse.Namespace):
    """The ``DistillConfig`` of ``--distill-loss``; UsageError naming --temperature or --task-weight given with
    tinybert (whose terms and temperature are fixed: the grid's ft-distill rows')."""
    from ds_kd.distill.module import DistillConfig
    from ds_kd.finetune.ltsft import bistil_task_losses

    if args.distill_loss == "tinybert":
        given = [f for f, v in (("--temperature", args.temperature), ("--task-weight", args.task_weight)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)}: not with --distill-loss tinybert (the grid's ft-distill loss, "
                             f"temperature 1 and the hard labels at weight 1); use --distill-loss bistil")
        return DistillConfig()
    return bistil_task_losses(0.0 if args.task_weight is None else args.task_weight,
                              2.0 if args.temperature is None else args.temperature)


def job_runner(args: argparse.Namespace):
    """Plain fine-tuning, task distillation from ``--teacher`` or LT-SFT (``--sparse-density``), with or without it.
    The job checks the ``--model`` and ``--teacher`` folders first (UsageError naming the flag)."""
    # torch, after the command line: --help stays quick
    from ds_kd.finetune.distill import run_ft_distill, teacher_model_dir
    from ds_kd.finetune.job import run
    from ds_kd.finetune.ltsft import SparseConfig, run_ltsft
    from ds_kd.models.modeldir import read_config

    losses = distill_losses(args) if args.teacher else None
    if args.sparse_density is not None:
        sparse = SparseConfig(args.sparse_density, args.full_epochs)
        fit = lambda cfg: run_ltsft(cfg, sparse, args.teacher, losses)  # noqa: E731
    elif args.teacher:
        fit = lambda cfg: run_ft_distill(cfg, args.teacher, losses)  # noqa: E731
    else:
        fit = run

    def job(cfg):
        for flag, check in (("--model", read_config), ("--teacher", teacher_model_dir)):
            if (path := getattr(args, flag[2:])) is not None:
                try:
                    check(path)
                except FileNotFoundError as e:
                    raise UsageError(f"{flag} {e}") from None
        return fit(cfg)
    return job


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, wandb, job = parse_job(argv)  # the settings are checked as the config is built
        result = job(cfg)
    except (FileNotFoundError, FileExistsError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    zs = "n/a" if result.zero_shot_avg is None else f"{result.zero_shot_avg:.4f}"
    en = "n/a" if result.en is None else f"{result.en:.4f}"
    print(f"[finetune] {result.task} {result.model} seed {result.seed}: en {result.metric} {en}, "
          f"zero-shot avg {zs}, best epoch {result.best_epoch}, {result.seconds:.0f}s -> {result.config['out']}")
    from ds_kd.logbook import log_results
    from ds_kd.eval.report import job_tables

    log_results(Path(cfg.out), wandb, "finetune", {"job": str(Path(cfg.out).resolve())}, job_tables(cfg.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
