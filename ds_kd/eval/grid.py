"""The evaluation grid: every (model row, task, seed) fine-tuning job once, in parallel, resumable.

Layout of a grid directory::

    <out>/grid.json                              the plan: model rows (dir, role, teacher), tasks, seeds, options
    <out>/jobs/<row>/<task>/seed<s>/job.json     what the job runs (written before it starts)
    <out>/jobs/<row>/<task>/seed<s>/log.txt      its output (appended on every attempt)
    <out>/jobs/<row>/<task>/seed<s>/result.json  written last, atomically, by the job: its presence means done
    <out>/jobs/<row>/<task>/seed<s>/model/       the fine-tuned model, for rows that teach an ft-distill row

A row is a model directory with a name (``NAME=DIR``), or an ft-distill row ``STUDENT=TEACHER`` named
``"STUDENT (ft-distill)"``: the encoder of row STUDENT fine-tuned with distillation from row TEACHER's grid job
of the same task and seed (which therefore runs first, saving its model). Each job runs as its own process, so a
crash of one job leaves the others running: forked from a fork server that has imported torch, transformers,
the metrics and W&B once (:func:`start`; a job's imports cost about 7.5 s of a 2-core AVX2 CPU, half a tiny
model's whole job: ``benchmarks/bench_grid.py``), or with another ``python`` ``python -m ds_kd.eval.grid --job <job.json>``; a job is done
when its ``result.json`` exists (a teacher also needs its ``model/``), so a grid started again after a crash or
a kill runs only what is missing, and a job killed midway resumes from its last epoch checkpoint. The grid owns
its job directories: a job whose settings changed since its last attempt (``job.json``: fine-tuning options,
data, model directory, ft-distill options and its teacher job's settings; not threads or device) is cleared
and run again, the others are kept. Every model directory is checked (``ds_kd.models.modeldir.load_tokenizer``)
before any job starts. Workers: one per GPU (a job's ``CUDA_VISIBLE_DEVICES`` is one entry of the grid's own),
else ``workers`` CPU processes with ``cores // workers`` torch threads each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ds_kd.errors import UsageError
from ds_kd.logbook import WandbConfig
from ds_kd.manifest import atomic_write_text, describe_differences, settings_differences
from ds_kd.data.tasks import get_task, present_tasks

GRID_JSON = "grid.json"
JOB_JSON = "job.json"
RESULT = "result.json"  # ds_kd.finetune.job.RESULT, repeated so the grid process need not import torch
LAST_CHECKPOINT = "checkpoint/last.pt"  # ds_kd.finetune.state's CHECKPOINT/LAST, for the same reason
LOG = "log.txt"
ROLES = ("teacher", "student", "baseline")
FT_DISTILL_SUFFIX = " (ft-distill)"


@dataclass
class ModelRow:
    """One row of the paper's tables."""

    name: str
    """Row name as it appears in the tables (e.g. ``mLeanBERT``, ``Vanilla mLeanBERT (ft-distill)``)."""
    model_dir: str
    """Encoder directory (an export of ours or an HF BERT checkpoint with its tokenizer)."""
    role: str = "baseline"
    """teacher | student | baseline; the report marks the best student per column."""
    teacher: str | None = None
    """ft-distill rows: the name of the teacher row whose fine-tuned models (same task and seed) teach it."""
    ppl_run: str | None = None
    """Pretraining/distillation run directory whose ``manifest.json`` holds the validation perplexity."""


@dataclass
class GridConfig:
    """What ``run_grid`` runs."""

    rows: list[ModelRow]
    """Model rows (plain and ft-distill)."""
    tasks: list[str]
    """Task names: benchmarks of ``ds_kd.data.tasks.TASKS`` or tasks of one's own under ``data``."""
    data: str
    """Normalised task-data root."""
    seeds: list[int]
    """Seeds per (row, task)."""
    out: str
    """Grid directory."""
    workers: int | None = None
    """Parallel jobs; None: one per GPU, else half the CPU cores (at least 1)."""
    threads: int | None = None
    """torch threads per CPU job; None: cores // workers (at least 1)."""
    finetune: dict = field(default_factory=dict)
    """``FinetuneConfig`` fields for every job (epochs, lr, batch_size, ...)."""
    distill: dict = field(default_factory=dict)
    """``DistillConfig`` fields for the ft-distill rows (weights, temperature, layer_map)."""
    python: str = sys.executable
    """Interpreter that runs the jobs (this one's: forked from the grid's fork server; another: a subprocess)."""
    fork_server: bool = True
    """Fork the jobs from a server that imported their modules once; False: a fresh ``python`` per job."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B settings of the results logged when the grid ends (``launch/grid.py``; off unless asked for)."""


@dataclass
class GridJob:
    row: ModelRow
    task: str
    seed: int
    out: Path
    save_model: bool = False
    """This job's model teaches an ft-distill row."""
    teacher: "GridJob | None" = None
    """ft-distill rows: the job that must finish first."""

    @property
    def label(self) -> str:
        return f"{self.row.name} / {self.task} / seed {self.seed}"

    def done(self) -> bool:
        has_model = (self.out / "model" / "task_model.json").is_file()
        return (self.out / RESULT).is_file() and (has_model or not self.save_model)


@dataclass
class GridResult:
    num_jobs: int
    num_skipped: int
    """Jobs already finished before this run."""
    num_done: int
    """Jobs finished by this run."""
    failed: list[tuple[str, str]]
    """(job, log path or reason) of every failed job."""


def slug(name: str) -> str:
    """A directory name for a row name (``Vanilla mLeanBERT (ft-distill)`` -> ``Vanilla_mLeanBERT_ft-distill``)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", name)).strip("_") or "model"


def run_manifest(model_dir: str) -> dict:
    """The ``manifest.json`` of the pretraining or distillation run that exported ``model_dir`` (``<run>/export``);
    {} for any other directory (a public checkpoint, a fine-tuned model)."""
    run = ppl_run_of(model_dir)
    return json.loads((Path(run) / "manifest.json").read_text(encoding="utf-8")) if run else {}


def default_roles(model_dirs: dict[str, str], teachers: set[str] = frozenset()) -> dict[str, str]:
    """Each row's role from the manifests of the runs that made the models (``stage``), never from its name:
    a row is a teacher when it teaches an ft-distill row (``teachers``) or its directory is the ``teacher`` of a
    distillation run among ``model_dirs``; a student when its model was distilled (stage ``distill``); else a
    baseline (a Vanilla pretraining, a public checkpoint). ``model_dirs``: row name -> model directory."""
    manifests = {name: run_manifest(d) for name, d in model_dirs.items()}
    taught = {str(Path(m["teacher"]).resolve()) for m in manifests.values()
              if m.get("stage") == "distill" and m.get("teacher")}
    return {name: "teacher" if name in teachers or str(Path(d).resolve()) in taught
            else "student" if manifests[name].get("stage") == "distill" else "baseline"
            for name, d in model_dirs.items()}


def ppl_run_of(model_dir: str) -> str | None:
    """``<run>/export`` of a pretraining or distillation run: ``<run>`` (whose manifest has the perplexity)."""
    path = Path(model_dir)
    if path.name == "export" and (path.parent / "manifest.json").is_file():
        return str(path.parent)
    return None


def build_rows(models: list[tuple[str, str]], ft_distill: list[tuple[str, str]] = (),
               roles: dict[str, str] | None = None, ppl: dict[str, str] | None = None) -> list[ModelRow]:
    """Rows from ``NAME=DIR`` pairs and ``STUDENT=TEACHER`` ft-distill pairs; ``roles`` overrides the default
    role (:func:`default_roles`) of any row, ``ppl`` the perplexity run of any row."""
    roles, ppl = roles or {}, ppl or {}
    dirs = dict(models)
    if len(dirs) != len(models):
        raise UsageError(f"a model name is given twice in --models: {[n for n, _ in models]}")
    for student, teacher in ft_distill:
        for name, what in ((student, "student"), (teacher, "teacher")):
            if name not in dirs:
                raise UsageError(f"--ft-distill {student}={teacher}: the {what} {name!r} is not one of --models "
                                 f"({', '.join(dirs) or 'none'})")
    default = default_roles(dirs, {t for _, t in ft_distill})
    rows = [ModelRow(name, d, default[name], None, ppl.get(name) or ppl_run_of(d)) for name, d in models]
    rows += [ModelRow(s + FT_DISTILL_SUFFIX, dirs[s], "student", t) for s, t in ft_distill]
    names = [r.name for r in rows]
    for name, role in roles.items():
        if name not in names:
            raise UsageError(f"role given for {name!r}, which is no row of the grid ({', '.join(names)})")
        if role not in ROLES:
            raise UsageError(f"role {role!r} of {name!r}: expected one of {', '.join(ROLES)}")
    for row in rows:
        row.role = roles.get(row.name, row.role)
    slugs = [slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise UsageError(f"row names {names} give clashing directory names {slugs}")
    return rows


def plan(cfg: GridConfig) -> list[GridJob]:
    """Every (row, task, seed) job; teachers of ft-distill rows first (and saving their model)."""
    for task in cfg.tasks:
        get_task(task, cfg.data)
    by_key: dict[tuple[str, str, int], GridJob] = {}
    for row in cfg.rows:
        for task in cfg.tasks:
            for seed in cfg.seeds:
                by_key[row.name, task, seed] = GridJob(row, task, seed, Path(cfg.out) / "jobs" / slug(row.name)
                                                       / task / f"seed{seed}")
    for job in by_key.values():
        if job.row.teacher:
            job.teacher = by_key[job.row.teacher, job.task, job.seed]
            job.teacher.save_model = True
    return sorted(by_key.values(), key=lambda j: (not j.save_model, j.teacher is not None))


def job_spec(job: GridJob, cfg: GridConfig, threads: int) -> dict:
    """The content of ``job.json``: the job's ``FinetuneConfig`` fields (resuming its own checkpoint where it has
    one, with ``threads`` torch threads), a digest of the task data's manifest, and for ft-distill rows the
    teacher, the distillation options and the teacher job's settings (a re-run teacher makes its students
    re-run)."""
    finetune = {**cfg.finetune, "model": job.row.model_dir, "task": job.task, "data": cfg.data, "out": str(job.out),
                "seed": job.seed, "name": job.row.name, "save_model": job.save_model or cfg.finetune.get("save_model",
                                                                                                        False),
                "threads": threads, "resume": (job.out / LAST_CHECKPOINT).is_file()}
    manifest = Path(cfg.data) / job.task / "manifest.json"
    spec = {"finetune": finetune, "threads": threads,
            "data_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None}
    if job.teacher is not None:
        spec["teacher"] = str(job.teacher.out / "model")
        spec["distill"] = cfg.distill
        spec["teacher_settings"] = spec_settings(job_spec(job.teacher, cfg, threads))
    return spec


def spec_settings(spec: dict) -> dict:
    """What in a ``job.json`` determines the job's result: all but the thread count and the fine-tuning fields
    of ``ds_kd.finetune.state.NOT_SETTINGS`` (device, evaluation batch, resume, ...)."""
    from ds_kd.finetune.state import NOT_SETTINGS

    return {**{k: v for k, v in spec.items() if k != "threads"},
            "finetune": {k: v for k, v in spec.get("finetune", {}).items() if k not in NOT_SETTINGS}}


def refresh(job: GridJob, cfg: GridConfig, threads: int) -> bool:
    """Clear the outputs of a job whose settings differ from its last attempt's ``job.json`` (the grid owns its
    job directories: the job then runs again from scratch); True when it did."""
    from ds_kd.finetune.state import JOB_OUTPUTS

    path = job.out / JOB_JSON
    if not path.is_file():
        return False
    diffs = settings_differences(spec_settings(json.loads(path.read_text(encoding="utf-8"))),
                                 spec_settings(job_spec(job, cfg, threads)))
    if not diffs:
        return False
    print(f"[grid] {job.label}: settings changed since its last run ({describe_differences(diffs)}): running it "
          f"again", flush=True)
    for name in JOB_OUTPUTS:
        target = job.out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    return True


def check_task_data(cfg: GridConfig) -> None:
    """Every task of the grid has its normalised data, before any job starts; raises UsageError naming the first
    missing folder and the command that writes it."""
    missing = [task for task in cfg.tasks if task not in present_tasks(cfg.data)]
    if missing:
        raise UsageError(f"no task data for {', '.join(missing)} under --data {cfg.data} ({Path(cfg.data) / missing[0]}"
                         f"/manifest.json is missing): write it with `python -m data_prep tasks --task {missing[0]} "
                         f"--src SRC --out {cfg.data}`, or leave it out of --tasks (present: "
                         f"{', '.join(present_tasks(cfg.data)) or 'none'})")


def check_models(cfg: GridConfig) -> None:
    """Every row's model directory has its tokenizer, which fits the model (``ds_kd.models.modeldir``), before any job
    starts; raises FileNotFoundError / ValueError naming the row and the directory."""
    from ds_kd.models.modeldir import load_tokenizer

    for row in cfg.rows:
        if not row.teacher:  # an ft-distill row shares its student row's directory
            load_tokenizer(row.model_dir, f"the grid (--models {row.name})")


def run_job_file(path: Path | str) -> int:
    """Run the job described by a ``job.json`` (the grid's worker processes call this)."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
    from ds_kd.finetune.job import FinetuneConfig, run

    cfg = FinetuneConfig(**spec["finetune"])
    if spec.get("teacher"):
        from ds_kd.distill.module import DistillConfig
        from ds_kd.finetune.distill import run_ft_distill

        result = run_ft_distill(cfg, spec["teacher"], DistillConfig(**spec.get("distill", {})))
    else:
        result = run(cfg)
    print(f"[grid job] {result.model} / {result.task} / seed {result.seed}: en {result.en} zero-shot "
          f"{result.zero_shot_avg} in {result.seconds:.1f}s", flush=True)
    return 0


def count_gpus(finetune: dict) -> int:
    if str(finetune.get("device") or "").startswith("cpu"):
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable torch/CUDA means CPU workers
        return 0


def gpu_ids(num_gpus: int) -> list[str]:
    """This process's ``num_gpus`` GPUs as a job's ``CUDA_VISIBLE_DEVICES`` must name them: the entries of the
    grid's own ``CUDA_VISIBLE_DEVICES`` (indices, ``GPU-<uuid>`` or ``MIG-<uuid>``, as SLURM or a shared node
    hands them out), else ``0 .. num_gpus-1``. A job told ``i`` uses the machine's GPU i, not the grid's i-th."""
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return visible[:num_gpus] if visible else [str(i) for i in range(num_gpus)]


def worker_layout(cfg: GridConfig) -> tuple[int, int, list[str | None]]:
    """(workers, threads per job, CUDA_VISIBLE_DEVICES per worker slot or None on CPU)."""
    cores = os.cpu_count() or 1
    num_gpus = count_gpus(cfg.finetune)
    if num_gpus:
        workers = cfg.workers or num_gpus
        gpus = gpu_ids(num_gpus)
        devices = [gpus[i % len(gpus)] for i in range(workers)]
    else:
        workers = cfg.workers or max(1, cores // 2)
        devices = [None] * workers
    threads = cfg.threads or max(1, cores // workers)
    return workers, threads, devices


def write_plan(cfg: GridConfig) -> None:
    """``grid.json``: the rows (merged with those of earlier runs into the same directory), tasks, seeds and
    options, for the report and for a later look at what ran."""
    path = Path(cfg.out) / GRID_JSON
    rows = {}
    if path.is_file():
        rows = {r["name"]: r for r in json.loads(path.read_text(encoding="utf-8")).get("rows", [])}
    rows.update({r.name: asdict(r) for r in cfg.rows})
    plan_dict = {"rows": list(rows.values()), "tasks": cfg.tasks, "seeds": cfg.seeds, "data": cfg.data,
                 "finetune": cfg.finetune, "distill": cfg.distill}
    atomic_write_text(path, json.dumps(plan_dict, indent=2) + "\n")


JOB_PRELOAD = ("torch", "ds_kd.finetune.job", "ds_kd.finetune.distill", "ds_kd.finetune.metrics",
               "ds_kd.logbook", "transformers.models.bert.modeling_bert", "wandb", "ds_kd.eval.grid")
"""Modules the fork server imports once for every job it forks (a missing optional one is skipped)."""


class ForkedJob:
    """A job process forked from the grid's fork server, with ``subprocess.Popen``'s ``poll``, ``returncode``
    and ``kill`` (an exception in the job is exit status 1, its traceback in the job's log)."""

    def __init__(self, process) -> None:
        self.process = process

    def poll(self) -> int | None:
        return self.process.exitcode

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()


_fork_context = None


def fork_context():
    """The ``forkserver`` multiprocessing context with :data:`JOB_PRELOAD` (one server per grid process, started
    at the first job). A server, not a plain fork of the grid: it has run no torch thread pool, so its children
    start clean."""
    global _fork_context
    if _fork_context is None:
        import multiprocessing

        _fork_context = multiprocessing.get_context("forkserver")
        _fork_context.set_forkserver_preload(list(JOB_PRELOAD))
    return _fork_context


def stop_fork_server() -> None:
    """Stop the fork server, if one runs, and wait for it: its jobs' CPU time then counts among this process's
    children (``resource.RUSAGE_CHILDREN``, e.g. the demo's per-stage CPU seconds), and no server outlives the
    grid. The next job starts a new one."""
    if _fork_context is not None:
        from multiprocessing import forkserver

        stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own (3.8+), used by its tests
        if stop is not None:
            stop()


def run_forked_job(spec_path: str, log_path: str, env: dict[str, str]) -> None:
    """The body of a forked job: its environment, stdout and stderr (file descriptors 1 and 2, so native code's
    output too) appended to its log, then :func:`run_job_file`; exits with its status."""
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)
    # transformers and huggingface_hub read HF_HUB_DISABLE_PROGRESS_BARS when imported, here before the job's
    # environment: the log is a file, so their bars are turned off as that variable would have
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    sys.exit(run_job_file(spec_path))


def start(job: GridJob, cfg: GridConfig, threads: int, device: str | None) -> subprocess.Popen | ForkedJob:
    """Start ``job``: its job.json written, its output appended to its log.txt; forked from the fork server when
    ``cfg.python`` is this interpreter, else ``cfg.python -m ds_kd.eval.grid --job``. Either way in the grid's
    process group: killing the grid's group (Ctrl-C, SIGKILL) takes its jobs down too."""
    job.out.mkdir(parents=True, exist_ok=True)
    spec_path = job.out / JOB_JSON
    atomic_write_text(spec_path, json.dumps(job_spec(job, cfg, threads), indent=2) + "\n")
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # the log is a file: no bars
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    forked = (cfg.fork_server and os.path.realpath(cfg.python) == os.path.realpath(sys.executable)
              and sys.platform != "win32")
    command = (["(forked)", "ds_kd.eval.grid", "--job"] if forked else [cfg.python, "-m", "ds_kd.eval.grid", "--job"])
    with open(job.out / LOG, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)} {spec_path}"
                  f"{' (CUDA_VISIBLE_DEVICES=' + device + ')' if device else ''}\n")
    if forked:
        # not daemonic: a job may start processes of its own (a daemonic one may not)
        process = fork_context().Process(target=run_forked_job, args=(str(spec_path), str(job.out / LOG), env))
        process.start()
        return ForkedJob(process)
    log = open(job.out / LOG, "a", encoding="utf-8")
    proc = subprocess.Popen([*command, str(spec_path)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env})
    log.close()
    return proc


def job_warnings(job: GridJob) -> list[str]:
    """The unknown-token warnings of a finished job (``ds_kd.models.vocab_check``, from its ``result.json``): shown by
    the grid, since the job's own are in its log."""
    from ds_kd.models.vocab_check import unknown_warnings

    result = json.loads((job.out / RESULT).read_text(encoding="utf-8"))
    return unknown_warnings(job.row.model_dir, result.get("unknown_token_rates", {}))


def run_grid(cfg: GridConfig, poll_seconds: float = 0.2) -> GridResult:
    """Run every unfinished job of the grid, ``workers`` at a time; returns counts and the failures."""
    from tqdm.auto import tqdm

    jobs = plan(cfg)
    check_task_data(cfg)
    check_models(cfg)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_plan(cfg)
    workers, threads, devices = worker_layout(cfg)
    for job in jobs:
        refresh(job, cfg, threads)
    pending = [j for j in jobs if not j.done()]
    num_skipped = len(jobs) - len(pending)
    failed: list[tuple[str, str]] = []
    failed_jobs: set[int] = set()
    running: dict[int, tuple[subprocess.Popen | ForkedJob, GridJob]] = {}  # worker slot -> process
    num_done = 0
    where = f"{len(set(devices))} GPU(s)" if devices[0] is not None else f"CPU, {threads} thread(s) per job"
    print(f"[grid] {len(jobs)} jobs ({num_skipped} already done), {workers} worker(s) on {where}", flush=True)
    bar = tqdm(total=len(jobs), initial=num_skipped, desc="grid", unit="job", dynamic_ncols=True, disable=None)

    shown: list[tuple] = []

    def show() -> None:  # only on a change: a log file should not get a line per poll
        state = (num_skipped + num_done, len(failed), len(running), len(pending) + len(running))
        if shown[-1:] != [state]:
            shown.append(state)
            bar.set_postfix(done=state[0], failed=state[1], running=state[2], remaining=state[3])
            if bar.disable:  # not a terminal: a plain line instead of the bar's carriage returns
                print(f"[grid] {state[0]}/{len(jobs)} jobs done, {state[1]} failed, {state[2]} running, "
                      f"{state[3]} remaining", flush=True)

    try:
        show()
        while pending or running:
            for slot in [s for s in range(workers) if s not in running]:
                job = next((j for j in pending if j.teacher is None or j.teacher.done()
                            or id(j.teacher) in failed_jobs), None)
                if job is None:
                    break
                pending.remove(job)
                if job.teacher is not None and id(job.teacher) in failed_jobs:
                    failed_jobs.add(id(job))
                    failed.append((job.label, f"not run: its teacher job ({job.teacher.label}) failed"))
                    bar.update(1)
                    continue
                running[slot] = (start(job, cfg, threads, devices[slot]), job)
            show()
            time.sleep(poll_seconds)
            for slot, (proc, job) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                bar.update(1)
                if proc.returncode == 0 and job.done():
                    num_done += 1
                    for line in job_warnings(job):
                        bar.write(f"[grid] {job.label}: {line}")
                else:
                    failed_jobs.add(id(job))
                    failed.append((job.label, str(job.out / LOG)))
                    bar.write(f"[grid] FAILED {job.label} (exit {proc.returncode}): see {job.out / LOG}")
            show()
    finally:
        for proc, _ in running.values():  # interrupted: do not leave orphans behind
            proc.kill()
        stop_fork_server()
        bar.close()
    return GridResult(len(jobs), num_skipped, num_done, failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run one grid job from its job.json (used by the grid's workers).")
    p.add_argument("--job", required=True, help="path of the job.json to run")
    return run_job_file(p.parse_args(argv).job)


if __name__ == "__main__":
    sys.exit(main())
