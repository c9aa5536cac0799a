"""Fine-tune one encoder on one task's English data and test it zero-shot on every language (paper §4).

    python launch/finetune.py --model DIR --task xnli --data DATA --seed 1 --out runs/xnli/mLeanBERT/1

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
    add_wandb_flags(p.add_argument_group("Weights & Biases: the job's results as tables"), RESULTS_WANDB_HELP)
    return p


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    return parse_all(argv)[0]


def parse_all(argv: list[str] | None = None):
    """(FinetuneConfig, WandbConfig) of the command line."""
    args = build_parser().parse_args(argv)
    wandb = wandb_config(args)
    names = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names}), wandb


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, wandb = parse_all(argv)  # the settings are checked as the config is built
        from ds_kd.finetune.job import run  # torch, after the command line: --help stays quick

        result = run(cfg)
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
