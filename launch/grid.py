"""Fine-tune every model row on every task with every seed (the paper's grid), in parallel and resumable.

    python launch/grid.py --models mBERT8=runs/mbert8-base/export mLeanBERT=runs/mLeanBERT/export \\
        "Vanilla mLeanBERT=runs/vanilla-leanbert/export" --ft-distill mLeanBERT=mBERT8 \\
        --tasks all --data data/tasks --seeds 1 2 3 4 --out runs/grid

Jobs already finished with the same settings (their result.json exists) are skipped, so the same command
picks up after a crash (a killed job resumes from its last epoch); a job whose settings changed (e.g. another
--epochs or --lr) is run again. Every model directory must hold its tokenizer. Exits 1 when a job failed (each
failure is listed with its log), 2 on a bad model directory. Tables: python launch/report.py OUT.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from ds_kd.cli import RESULTS_WANDB_HELP, add_wandb_flags, name_value, wandb_config
from ds_kd.errors import UsageError
from ds_kd.cli.flags import HelpFormatter, add_list_argument, default_text, field_doc
from ds_kd.finetune.config import FinetuneConfig
from ds_kd.eval.grid import ROLES, GridConfig, build_rows, run_grid
from ds_kd.logbook import log_results
from ds_kd.eval.report import job_tables
from ds_kd.data.tasks import TASKS, present_tasks

# Set by the grid for each job (threads: the grid's own --threads; every job resumes its own checkpoint, and a
# job whose settings changed is cleared and run again, so --resume / --overwrite have no grid meaning).
PER_JOB = {"model", "task", "data", "out", "seed", "name", "threads", "resume", "overwrite"}
KD_OPTIONS = {  # --kd-* flag -> (DistillConfig field, type, help)
    "task-weight": ("mlm_weight", float, "weight of the student's own task loss (default 1)"),
    "output-weight": ("output_weight", float, "weight of the soft cross-entropy on the teacher's task logits "
                                              "(default 1)"),
    "embedding-weight": ("embedding_weight", float, "weight of the embedding MSE (default 1)"),
    "hidden-weight": ("hidden_weight", float, "weight of the mapped layers' hidden-state MSE (default 1)"),
    "attention-weight": ("attention_weight", float, "weight of the mapped layers' attention-score MSE (default 1)"),
    "temperature": ("temperature", float, "temperature of the output loss (default 1; the loss is scaled by T^2)"),
    "layer-map": ("layer_map", int, "teacher layer (1-based) per student layer, e.g. 3 6 9 12 (default: uniform)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                   type=name_value,
                   help="model rows: table name = encoder directory (an export of ours or an HF BERT checkpoint "
                        "with its tokenizer); quote names with spaces")
    g.add_argument("--ft-distill", nargs="+", default=[], metavar="STUDENT=TEACHER",
                   type=name_value,
                   help="ft-distill rows: the encoder of row STUDENT fine-tuned with distillation from row "
                        "TEACHER's fine-tuned job of the same task and seed; the row is named 'STUDENT (ft-distill)' "
                        "and TEACHER's jobs save their model and run first")
    add_list_argument(g, "--tasks", default=None, metavar="TASK",
                      help=f"tasks to run, space- or comma-separated, or 'all' ({', '.join(TASKS)}), or tasks "
                           f"of one's own under --data (python -m data_prep tasks --task own); a task "
                           f"without data under --data is refused before any job starts (default: the tasks "
                           f"present under --data, i.e. with a <task>/manifest.json)")
    g.add_argument("--data", required=True, help="normalised task-data root (python -m data_prep tasks ...)")
    add_list_argument(g, "--seeds", item_type=int, default=[1, 2, 3, 4],
                      help="seeds per (row, task), space- or comma-separated")
    g.add_argument("--out", required=True, help="grid directory (jobs/, grid.json)")
    g.add_argument("--workers", type=int, default=None,
                   help="jobs at a time (default: one per GPU; on CPU half the cores, at least 1)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per CPU job (default: cores // workers, at least 1)")
    g.add_argument("--no-fork-server", dest="fork_server", action="store_false",
                   help="start every job as a fresh interpreter (python -m ds_kd.eval.grid --job) instead of forking "
                        "it from a server that imported torch, transformers, the metrics and W&B once (default: "
                        "fork; benchmarks/bench_grid.py measures the difference)")
    g.add_argument("--ppl", nargs="+", default=[], metavar="NAME=RUN", type=name_value,
                   help="pretraining/distillation run directory of a row, for Table 2 (default: the parent of a "
                        "model directory named 'export' when it holds a manifest.json)")
    for role in ROLES:
        g.add_argument(f"--{role}s", nargs="+", default=[], metavar="NAME",
                       help=f"rows whose role is {role} (default roles, from the manifest of the run that exported "
                            f"each model, never from its name: teachers of ft-distill rows and models that taught a "
                            f"distilled row teach; distilled models (stage distill) are students; others, e.g. "
                            f"Vanilla pretraining or a public checkpoint, are baselines)")
    add_wandb_flags(p.add_argument_group("Weights & Biases: every job's results as tables, once the grid ends"),
                    RESULTS_WANDB_HELP)
    f = p.add_argument_group("fine-tuning options for every job (default: launch/finetune.py's)")
    for fld in fields(FinetuneConfig):
        if fld.name in PER_JOB:
            continue
        flag, doc = "--" + fld.name.replace("_", "-"), field_doc(FinetuneConfig, fld.name)
        default = None if fld.default is MISSING else fld.default
        if fld.name == "bf16":
            f.add_argument("--no-bf16", dest="bf16", action="store_const", const=False, default=None,
                           help="Run CUDA in fp32. " + doc)
        elif fld.type == "bool":
            f.add_argument(flag, action="store_const", const=True, default=None, help=doc)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(fld.type, str)
            shown = doc if "default" in doc.lower() else f"{doc} (default: {default_text(default)})"
            f.add_argument(flag, type=kind, default=None, help=shown)
    k = p.add_argument_group("ft-distill options (the losses of distillation during fine-tuning)")
    for flag, (name, kind, doc) in KD_OPTIONS.items():
        k.add_argument(f"--kd-{flag}", dest=f"kd_{name}", type=kind, default=None,
                       nargs="+" if name == "layer_map" else None, help=doc)
    return p


def parse_args(argv: list[str] | None = None) -> GridConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks or present_tasks(args.data)
    if not tasks:
        parser.error(f"no task data under --data {args.data} (no <task>/manifest.json): write it with "
                     f"`python -m data_prep tasks --task all --src SRC --out {args.data}`")
    unknown = [t for t in tasks if t not in TASKS and t not in present_tasks(args.data)]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}, 'all', or a task of one's "
                     f"own with its data under --data")
    roles = {name: role for role in ROLES for name in getattr(args, f"{role}s")}
    try:
        rows = build_rows(args.models, args.ft_distill, roles, dict(args.ppl))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finetune = {fld.name: getattr(args, fld.name) for fld in fields(FinetuneConfig)
                if fld.name not in PER_JOB and getattr(args, fld.name) is not None}
    distill = {name: getattr(args, f"kd_{name}") for name, _, _ in KD_OPTIONS.values()
               if getattr(args, f"kd_{name}") is not None}
    return GridConfig(rows, tasks, args.data, args.seeds, args.out, args.workers, args.threads, finetune, distill,
                      wandb=wandb_config(args), fork_server=args.fork_server)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        result = run_grid(cfg)
    except (FileNotFoundError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[grid] {result.num_jobs} jobs: {result.num_skipped} were done before, {result.num_done} finished now, "
          f"{len(result.failed)} failed -> {cfg.out}", flush=True)
    for label, where in result.failed:
        print(f"[grid] failed: {label}: {where}", flush=True)
    if log_results(Path(cfg.out), cfg.wandb, "finetune", {"grid": str(Path(cfg.out).resolve())}, job_tables(cfg.out)):
        print("[grid] results logged to W&B (tables finetune/jobs, finetune/scores, finetune/dev_history)", flush=True)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
