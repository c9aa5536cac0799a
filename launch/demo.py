"""The main job end to end on the default corpus, at demo size: ``python launch/demo.py --out out/demo``.

default corpus (LibreOffice help, 8 languages) -> held-out pages and derived demo tasks -> corpus (mix, BPE,
shards) -> two teachers of the mbert8-base and mbert8-large shapes pretrained on 2 ranks (ZeRO-3 and ZeRO-2) ->
Vanilla student, and a student distilled from each teacher -> fine-tuning grid on the demo tasks (with
ft-distill rows) -> cross-lingual retrieval -> inference speed -> the report's tables.

Each stage is one command run as a subprocess and writes its own directory; a stage whose output is complete
is skipped, so a re-run continues where the last one stopped. Models use the tiny CPU presets of the same
proportions as the paper's; the numbers show the system working, not the paper's results.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ds_kd.flags import HelpFormatter, add_list_argument  # noqa: E402

PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")

# Rows of the paper's tables -> (run directory, how it is made). Tiny presets stand in for the paper's shapes.
TEACHERS = {"mBERT8": ("mbert8-base", "tiny-base", "zero3"), "mBERT8-Large": ("mbert8-large", "tiny-large", "zero2")}
STUDENTS = {"mLeanBERT": "mBERT8", "mXLeanBERT": "mBERT8-Large"}


@dataclass(frozen=True)
class Stage:
    """One step of the demo."""

    name: str
    """Shown in the log."""
    argv: list[str]
    """Command line, run from the repository root."""
    done: Path | None = None
    """A file whose presence means the stage already finished (the stage is then skipped)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_ranks(script: str, args: list[str]) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script, *args]


def train_args(cfg: str, corpus: Path, out: Path, steps: int, lr: str) -> list[str]:
    return ["--deepspeed_config", f"ds_configs/{cfg}.json", "--data", str(corpus), "--out", str(out),
            "--max-steps", str(steps), "--ds-override", "train_micro_batch_size_per_gpu=32", "--lr", lr,
            "--warmup-steps", str(max(1, steps // 10)), "--num-workers", "1", "--max-len", "64",
            "--log-every", "20", "--eval-every", str(max(1, steps // 2)), "--wandb-mode", "offline"]


def build_stages(out: Path, cache: Path | None, steps: int, seeds: list[str], epochs: str) -> list[Stage]:
    raw, runs, grid = out / "raw", out / "runs", out / "grid"
    fetch = [PY, "-m", "data_prep", "libreoffice", "--raw", str(raw)]
    if cache is not None:
        fetch += ["--cache", str(cache)]
    stages = [
        Stage("default corpus: LibreOffice help in 8 languages", fetch, raw / "manifest.json"),
        Stage("hold out help pages; derived demo tasks in the benchmarks' formats",
              [PY, "-m", "data_prep", "demo_tasks", "--raw", str(raw), "--pretrain-raw", str(out / "raw_pretrain"),
               "--heldout", str(out / "heldout"), "--out", str(out / "task_src")],
              out / "task_src" / "manifest.json"),
        Stage("corpus: mix, BPE, shards (pretraining pages only)",
              [PY, "-m", "data_prep", "corpus", "--raw", str(out / "raw_pretrain"), "--out", str(out / "corpus"),
               "--total", "200000", "--vocab-size", "8000", "--bpe-sentences", "200000",
               "--val-per-lang", "300"], out / "corpus" / "shards" / "manifest.json"),
        Stage("normalise the demo tasks (the real loaders)",
              [PY, "-m", "data_prep", "tasks", "--task", "all", "--src", str(out / "task_src"),
               "--out", str(out / "tasks")], out / "tasks" / "mtop" / "manifest.json"),
    ]
    corpus = out / "corpus"
    for row, (run, preset, cfg) in TEACHERS.items():
        stages.append(Stage(f"pretrain teacher {row} ({preset}, 2 ranks, {cfg})",
                            on_two_ranks("launch/pretrain.py", ["--model", preset, *train_args(
                                cfg, corpus, runs / run, steps, "2e-3")]), runs / run / "manifest.json"))
    stages.append(Stage("pretrain Vanilla mLeanBERT (tiny-leanbert, no teacher, 2 ranks, zero2)",
                        on_two_ranks("launch/pretrain.py", ["--model", "tiny-leanbert", *train_args(
                            "zero2", corpus, runs / "vanilla-leanbert", steps, "2e-3")]),
                        runs / "vanilla-leanbert" / "manifest.json"))
    for student, teacher in STUDENTS.items():
        teacher_run, _, cfg = TEACHERS[teacher]
        stages.append(Stage(f"distil {student} from {teacher} (frozen teacher + student in one engine, {cfg})",
                            on_two_ranks("launch/distill.py", [
                                "--teacher", str(runs / teacher_run / "export"), "--student", "tiny-leanbert",
                                *train_args(cfg, corpus, runs / student.lower(), steps, "2e-3")]),
                            runs / student.lower() / "manifest.json"))
    models = model_dirs(runs)
    model_args = [f"{name}={path}" for name, path in models.items()]
    stages += [
        Stage("fine-tune on English, test zero-shot: models x tasks x seeds (+ ft-distill rows)",
              [PY, "launch/grid.py", "--models", *model_args, "--ft-distill", "mLeanBERT=mBERT8",
               "Vanilla mLeanBERT=mBERT8", "--tasks", "all", "--data", str(out / "tasks"), "--seeds", *seeds,
               "--out", str(grid), "--epochs", epochs, "--lr", "1e-3", "--head-lr", "1e-3", "--batch-size", "16",
               "--max-len", "64", "--beam-size", "1", "--workers", "2", "--threads", "1",
               # Minutes of pretraining leave a tiny model's embeddings too weak to fine-tune frozen (the
               # paper's protocol and launch/finetune.py's default): the demo trains them.
               "--unfreeze-embeddings"]),
        Stage("cross-lingual retrieval on held-out aligned paragraphs",
              [PY, "launch/retrieval.py", "--models", *model_args, "--heldout", str(out / "heldout"),
               "--out", str(out / "retrieval"), "--max-pairs", "300"], out / "retrieval" / "retrieval.md"),
        Stage("inference speed on this CPU",
              [PY, "launch/speed.py", "--models", *model_args, "--teacher-of",
               *[f"{s}={t}" for s, t in STUDENTS.items()], "Vanilla mLeanBERT=mBERT8",
               "--heldout", str(out / "heldout"), "--out", str(out / "speed")], out / "speed" / "speed.md"),
        Stage("report: the paper's tables, retrieval and speed",
              [PY, "launch/report.py", str(grid), "--out", str(out / "report"), "--extra",
               str(out / "retrieval" / "retrieval.md"), str(out / "speed" / "speed.md")]),
    ]
    return stages


def model_dirs(runs: Path) -> dict[str, Path]:
    """The table rows and the exports that stand for them."""
    rows = {row: runs / run / "export" for row, (run, _, _) in TEACHERS.items()}
    rows["Vanilla mLeanBERT"] = runs / "vanilla-leanbert" / "export"
    rows.update({student: runs / student.lower() / "export" for student in STUDENTS})
    return rows


def check_resources(out: Path, need_disk_gb: float, need_memory_gb: float) -> str | None:
    """A reason not to start, or None: say so before starting, not midway."""
    import psutil

    probe = out
    while not probe.exists():
        probe = probe.parent
    free_disk = shutil.disk_usage(probe).free / 2**30
    if free_disk < need_disk_gb:
        return (f"only {free_disk:.1f} GiB free under {probe}; the demo needs about {need_disk_gb:.0f} GiB "
                f"(packages, corpus, shards, checkpoints): free some space or pass --out elsewhere")
    memory = psutil.virtual_memory().available / 2**30
    if memory < need_memory_gb:
        return (f"only {memory:.1f} GiB of memory available; the demo needs about {need_memory_gb:.0f} GiB "
                f"(two training ranks with their data workers)")
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output root (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=None,
                   help="where downloaded packages are kept (default: ~/.cache/ds_kd/libreoffice)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each pretraining and distillation")
    add_list_argument(p, "--seeds", item_type=int, default=[1],
                      help="fine-tuning seeds per model and task, space- or comma-separated (default: 1, to stay "
                           "within minutes; the paper: 1 2 3 4)")
    p.add_argument("--epochs", default="5", help="fine-tuning epochs per job")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out.resolve()
    problem = check_resources(out, need_disk_gb=3, need_memory_gb=4)
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    stages = build_stages(out, args.cache, args.steps, [str(s) for s in args.seeds], args.epochs)
    start = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        if stage.done is not None and stage.done.exists():
            print(f"=== [{number}/{len(stages)}] {stage.name}: already done ({stage.done} exists)", flush=True)
            continue
        print(f"\n=== [{number}/{len(stages)}] {stage.name}\n$ {' '.join(stage.argv)}", flush=True)
        began = time.perf_counter()
        status = subprocess.run(stage.argv, cwd=ROOT).returncode
        if status != 0:
            print(f"=== stage '{stage.name}' failed with exit status {status}", file=sys.stderr)
            return status
        print(f"=== [{number}/{len(stages)}] {stage.name}: done in {time.perf_counter() - began:.0f} s", flush=True)
    report = out / "report" / "report.md"
    print("\n" + report.read_text(encoding="utf-8"))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s. Tables: {report}; charts: "
          f"{out / 'report'}/zero_shot_*.png; training curves: {out / 'runs'}/*/curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
