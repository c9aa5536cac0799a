"""XtremeDistil: distil a fine-tuned task teacher into a student of any shape on unlabelled transfer text.

    deepspeed launch/task_distill.py --teacher runs/wikiann-teacher/model --transfer data/corpus \\
        --task wikiann --data data/tasks --student tiny-leanbert --out runs/xd
    python launch/task_distill.py ...        # one process (a group of one)

Stages (Mukherjee & Hassan Awadallah 2020): (1) hidden-state MSE on the transfer text through learned
projections, the student's layers matched to the teacher's top ones; (2) MSE on the teacher's task logits on the
transfer text, the head alone first, then one more layer at a time top-down; (3) cross-entropy on the English
labels with the same unfreezing. Model selection and early stopping on English dev only; the test files are
read once, at the end. OUT/model is the student as a task model, OUT/result.json its scores in every test
language, OUT/stages.json a record per sub-stage, OUT/manifest.json written last. --resume continues a killed
run mid-stage, also on another number of ranks. Exit status 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from ds_kd.cli import main_guard, setup_logging
from ds_kd.finetune.config import EMBEDDINGS, LAYER_MAPS, STAGES, TaskDistillConfig
from ds_kd.cli.flags import HelpFormatter, field_doc

CHOICES = {"layer_map": LAYER_MAPS, "embeddings": EMBEDDINGS, "recipe": ("xtremedistil",)}


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``TaskDistillConfig`` field, its docstring as help (the formatter adds the default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the launcher passes it
    for f in fields(TaskDistillConfig):
        flag, doc = "--" + f.name.replace("_", "-"), field_doc(TaskDistillConfig, f.name)
        if f.name == "stages":
            p.add_argument(flag, nargs="+", choices=STAGES, default=list(STAGES), help=doc)
        elif f.name == "gradual_unfreezing":
            p.add_argument("--no-gradual-unfreezing", dest=f.name, action="store_false",
                           help="Train every group at once in stages 2 and 3 (one sub-stage each) instead of "
                                "unfreezing top-down one group at a time.")
        elif f.type == "bool":
            p.add_argument(flag, action="store_true", help=doc)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(f.type, str)
            required = f.default is MISSING
            p.add_argument(flag, type=kind, required=required, choices=CHOICES.get(f.name),
                           default=None if required else f.default, help=doc)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from ds_kd.train import engine as dist
    from ds_kd.finetune.xtremedistil_run import run

    names = {f.name for f in fields(TaskDistillConfig)}

    def go():
        cfg = TaskDistillConfig(**{k: (tuple(v) if k == "stages" else v) for k, v in vars(args).items()
                                   if k in names})
        result = run(cfg)
        if dist.is_main():
            print(f"[task-distill] {result.task} {result.model}: en {result.metric} {figure(result.en)}, "
                  f"zero-shot avg {figure(result.zero_shot_avg_paper)}, {result.seconds:.0f}s -> {cfg.out}", flush=True)

    return main_guard(go)


def figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
