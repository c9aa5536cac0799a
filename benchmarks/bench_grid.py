"""The grid's overhead: wall time of N jobs through the grid (one worker) against N single jobs run one after the
other with launch/finetune.py, on the same machine, the same model, data, options and thread count; and the grid's
jobs forked from its fork server (the default) against a fresh interpreter per job (--no-fork-server).

    python benchmarks/bench_grid.py --num-jobs 4                      # tiny generated encoder and PAWS-X-like data
    python benchmarks/bench_grid.py --model DIR --data DIR --task xnli --num-jobs 4 --max-train-examples 64

Prints the three times and the ratios. The single jobs and the grid with --no-fork-server start one Python
process per job, so their ratio measures what the grid adds: planning, job files, polling, progress and the
per-job command; the fork server's ratio to them measures the imports it saves per job. Runs alternate (alone,
grid, grid without the server, alone, ...) over --repeats so that a change in the machine's load hits every side.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ds_kd.cli.flags import HelpFormatter  # noqa: E402


def tiny_inputs(work: Path) -> tuple[Path, Path]:
    """A tiny encoder and tiny pawsx data (the test fixtures' generators)."""
    from tests.helpers.finetune_fixtures import make_model_dir, write_task_data

    return (make_model_dir(work / "encoder", "tiny-leanbert"),
            write_task_data(work / "data", "pawsx", "pair", ["en", "fr", "de"], num_train=16, num_eval=8))


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="encoder directory (default: a tiny generated one)")
    p.add_argument("--data", help="normalised task-data root (default: tiny generated pawsx data)")
    p.add_argument("--task", default="pawsx", help="task to fine-tune (default: pawsx)")
    p.add_argument("--num-jobs", type=int, default=4, help="N: jobs per side, seeds 1..N (default: 4)")
    p.add_argument("--repeats", type=int, default=1, help="measurements per side; the median is reported (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job on both sides (default: 1)")
    p.add_argument("--epochs", type=int, default=1, help="epochs per job (default: 1)")
    p.add_argument("--max-train-examples", type=int, default=None,
                   help="cap on English training records per job (default: all of them)")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_grid_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = (Path(args.model), Path(args.data)) if args.model and args.data else tiny_inputs(work)
    options = ["--epochs", str(args.epochs), "--batch-size", "8"]
    if args.max_train_examples:
        options += ["--max-train-examples", str(args.max_train_examples)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    seeds = [str(s) for s in range(1, args.num_jobs + 1)]
    alone, grid, fresh = [], [], []
    for r in range(args.repeats):
        for side in ("alone", "grid", "fresh"):
            shutil.rmtree(work / side, ignore_errors=True)
        alone.append(sum(timed([sys.executable, "launch/finetune.py", "--model", str(model), "--task", args.task,
                                "--data", str(data), "--seed", seed, "--out", str(work / "alone" / seed), *options],
                               env) for seed in seeds))
        for side, times, extra in (("grid", grid, []), ("fresh", fresh, ["--no-fork-server"])):
            times.append(timed([sys.executable, "launch/grid.py", "--models", f"bench={model}", "--tasks", args.task,
                                "--data", str(data), "--seeds", *seeds, "--out", str(work / side), "--workers", "1",
                                "--threads", str(args.threads), *options, *extra], env))
        print(f"repeat {r + 1}: alone {alone[-1]:.2f}s, grid {grid[-1]:.2f}s, grid --no-fork-server "
              f"{fresh[-1]:.2f}s", flush=True)
    a, g, f = statistics.median(alone), statistics.median(grid), statistics.median(fresh)
    n = args.num_jobs
    print(f"{n} jobs ({args.task}, {args.threads} thread(s), {os.cpu_count()} cores): alone {a:.2f}s "
          f"({a / n:.2f}s/job); grid, 1 worker, fork server {g:.2f}s ({g / n:.2f}s/job); grid --no-fork-server "
          f"{f:.2f}s ({f / n:.2f}s/job). Ratios: grid/alone {g / a:.3f}, fork server/fresh interpreters {g / f:.3f} "
          f"({(f - g) / n:.2f}s saved per job); --no-fork-server/alone {f / a:.3f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
