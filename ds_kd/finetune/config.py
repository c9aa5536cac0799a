"""The settings of one fine-tuning job (:class:`FinetuneConfig`) and of one XtremeDistil run
(:class:`TaskDistillConfig`), apart from the code that runs them so that the command lines build their ``--help``
from them without importing torch (the runs: :mod:`ds_kd.finetune.job`, :mod:`ds_kd.finetune.xtremedistil_run`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ds_kd.data.tasks import TASKS, get_task, present_tasks
from ds_kd.errors import UsageError


@dataclass
class FinetuneConfig:
    """One (model, task, seed) job."""

    model: str
    """Encoder directory: an export of ours or any HF BERT checkpoint, with its tokenizer files."""
    task: str
    """Task: xnli, pawsx, wikiann, matis or mtop (the benchmarks of the paper), or a task of one's own under
    ``data`` (``python -m data_prep tasks --task own``: docs/tasks.md)."""
    data: str
    """Normalised task-data root (holds ``<task>/<split>.<lang>.jsonl``)."""
    out: str
    """Job directory: ``result.json`` (and ``model/`` with ``save_model``)."""
    seed: int = 1
    """Seed of head initialisation, dropout and data order."""
    name: str | None = None
    """Model name recorded in the result (default: the run's name, i.e. the directory above ``export/`` for a
    pretraining or distillation export, else the model directory's name)."""
    epochs: int = 3
    """Passes over English train; the epoch with the best English dev score is kept."""
    lr: float = 2e-5
    """Peak learning rate of the encoder (BERT's fine-tuning range)."""
    head_lr: float = 1e-3
    """Peak learning rate of the freshly initialised head (pooler and classifier, tagger, mTOP decoder), every
    task kind alike; the paper does not state one. At the encoder's 2e-5 a fresh head learns nothing in a few
    epochs (docs/finetuning.md: a sweep of 2e-5 to 1e-2 on generated and demo tasks; 1e-3 is the smallest value at which
    the tagging, intent/slot and mTOP heads learnt there, and a real 12-layer encoder learnt with it)."""
    batch_size: int = 32
    """Training examples per step."""
    eval_batch_size: int = 64
    """Examples per batch when predicting."""
    max_len: int = 128
    """Encoder input length in sub-words, special tokens included; longer inputs are cut."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with linear warm-up; linear decay to zero after."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm weights)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    unfreeze_embeddings: bool = False
    """Train the embedding layers too (the paper keeps them frozen)."""
    beam_size: int = 4
    """mTOP decoding beam (1: greedy)."""
    device: str | None = None
    """torch device (default, when unset: cuda when available, else cpu)."""
    bf16: bool = True
    """bf16 autocast on CUDA (CPU always runs in fp32)."""
    max_train_examples: int | None = None
    """Use only the first N English training records, for smoke runs (default, when unset: all of them)."""
    save_model: bool = False
    """Also write the fine-tuned task model (best epoch) and tokenizer to ``<out>/model`` (a reusable teacher)."""
    threads: int | None = None
    """torch CPU threads. Unset: torch's default, $OMP_NUM_THREADS when set, else one per core (right for one job
    alone on its machine). Jobs sharing a machine should split its cores, e.g. ``--threads 1`` for two jobs on
    two cores: threads contending for the same cores slow each other down (the grid gives every job
    cores // workers)."""
    resume: bool = False
    """Continue a killed job from its last epoch checkpoint in ``out`` (same settings; --epochs may change)."""
    overwrite: bool = False
    """Start over when ``out`` already holds a job. Without it a finished job with the same settings is skipped
    and one with other settings (model, data, task, seed, epochs, learning rates, ...) is refused, naming them."""

    def __post_init__(self) -> None:
        get_task(self.task, self.data)  # an unknown task is an error now, not after loading the model
        for name in ("epochs", "batch_size", "eval_batch_size", "beam_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.max_len < 8:
            raise UsageError(f"--max-len must be at least 8 sub-words, got {self.max_len}")


# XtremeDistil (docs/task-distillation.md)
LAYER_MAPS = ("top", "uniform")
EMBEDDINGS = ("pca", "copy", "random")
STAGES = ("represent", "logits", "labels")
KINDS = ("tagging", "pair")
"""Task kinds distilled: one logits entry per token or per example."""
DISTILLED_BENCHMARKS = tuple(name for name, spec in TASKS.items() if spec.kind in KINDS)
"""The benchmarks XtremeDistil takes (xnli, pawsx, wikiann); tasks of one's own are all of a kind in KINDS."""


def distillable_tasks(data: Path | str) -> list[str]:
    """The tasks under ``data`` that XtremeDistil takes (``present_tasks``' order): those of a kind in KINDS."""
    return [t for t in present_tasks(data) if get_task(t, data).kind in KINDS] if Path(data).is_dir() else []


def check_distill_task(task: str, data: Path | str) -> None:
    """UsageError naming ``--task`` unless it is a benchmark of :data:`DISTILLED_BENCHMARKS` or a task of one's own
    under ``data`` (resolved as ``launch/finetune.py`` does, ``get_task``): matis and mtop are said to be outside
    this track, an unknown name gets the tasks under ``data`` that it takes."""
    if task in TASKS and TASKS[task].kind not in KINDS:
        raise UsageError(f"--task {task}: not supported by XtremeDistil, which distils token tagging and sentence "
                         f"(pair) classification ({', '.join(DISTILLED_BENCHMARKS)} and tasks of one's own), not "
                         f"intent and slots (matis) or parsing (mtop); fine-tune {task} with launch/finetune.py")
    try:
        kind = get_task(task, data).kind
    except UsageError:
        found = distillable_tasks(data)
        raise UsageError(f"--task {task}: neither a benchmark XtremeDistil takes ({', '.join(DISTILLED_BENCHMARKS)}) "
                         f"nor a task of one's own under --data {data} (no {Path(data) / task / 'manifest.json'}); "
                         f"the tasks there it takes: {', '.join(found) or 'none'} (python -m data_prep tasks writes "
                         f"them, --task own for one's own)") from None
    if kind not in KINDS:
        raise UsageError(f"--task {task}: a task of kind {kind}; XtremeDistil distils only {', '.join(KINDS)} tasks")


@dataclass
class TaskDistillConfig:
    """One XtremeDistil run (``launch/task_distill.py``)."""

    teacher: str
    """Fine-tuned teacher: a task-model directory (``launch/finetune.py --save-model``) or a job holding model/."""
    transfer: str
    """Transfer set: a corpus directory of ``python -m data_prep corpus`` written with the teacher's tokenizer."""
    task: str
    """Task: wikiann, xnli or pawsx, or a task of one's own under ``data`` (``python -m data_prep tasks --task
    own``); its English train/dev and every test language under ``data``. Not matis or mtop."""
    data: str
    """Normalised task-data root (``python -m data_prep tasks``)."""
    out: str
    """Run directory."""
    student: str = "tiny-leanbert"
    """Student shape: a preset name or a HF ``config.json`` (its vocabulary becomes the teacher's)."""
    recipe: str = "xtremedistil"
    """The recipe (only ``xtremedistil`` today)."""
    stages: tuple[str, ...] = STAGES
    """Stages to run, in order: represent, logits, labels."""
    gradual_unfreezing: bool = True
    """Stages 2 and 3 unfreeze top-down one group at a time (the head alone first); False
    (``--no-gradual-unfreezing``): one sub-stage per stage with every group trainable at once."""
    layer_map: str = "top"
    """Stage 1's map of student hidden states onto the teacher's: top (top-aligned) or uniform (every k-th)."""
    attention: bool = False
    """Add attention-score MSE of the mapped layers to stage 1."""
    temperature: float | None = None
    """Stage 2: None for MSE on the raw logits (XtremeDistil); a temperature for soft cross-entropy instead."""
    embeddings: str = "pca"
    """Student word embeddings: pca (the teacher's compressed to the student's width), copy (same width) or random."""
    freeze_embeddings: bool = False
    """Keep the student's embeddings frozen throughout (and out of the unfreezing schedule)."""
    transfer_batch: int = 32
    """Transfer rows per optimizer step, all ranks together (packed rows of ``max_len`` for per-token tasks)."""
    label_batch: int = 16
    """English training examples per optimizer step of stage 3, all ranks together."""
    transfer_rows: int = 0
    """0: the teacher runs online on every transfer batch of stages 1 and 2, each step reading new rows. N > 0:
    the teacher labels the first ceil(N / transfer_batch) global batches of the transfer order once, into a cache
    (``--teacher-cache``; its size is logged, and a cache over a quarter of the available memory is refused), and
    the transfer steps cycle over them: the first pass in the online order, each later one in a permutation
    seeded by (seed, pass). Worth it where the teacher's forward pass dominates a step and the transfer steps x
    transfer batch exceed N (docs/task-distillation.md)."""
    teacher_cache: str | None = None
    """Folder of the teacher-output caches of ``--transfer-rows``, one subfolder per key (teacher, transfer
    corpus, transfer seed, batch, rows, ...): share one across runs of the same teacher, transfer text and
    ``--transfer-seed`` to build it once (default, when unset: OUT/teacher_cache)."""
    represent_steps: int = 200
    """Optimizer steps of stage 1."""
    logits_steps: int = 100
    """Optimizer steps of each sub-stage of stage 2 (fewer when it stops early)."""
    labels_steps: int = 50
    """Optimizer steps of each sub-stage of stage 3 (fewer when it stops early)."""
    lr: float = 1e-3
    """AdamW learning rate (constant; a fresh optimizer per sub-stage, as the official code recompiles)."""
    eval_every: int = 25
    """Score English dev every this many steps of stages 2 and 3 (and at each sub-stage's end)."""
    patience: int = 3
    """Dev scores in a row below the best so far after which a sub-stage stops early (a tie counts as best)."""
    max_len: int = 128
    """Sub-words per transfer row and per labelled example."""
    seed: int = 1
    """Seed of the student's initialisation, the data orders and dropout."""
    transfer_seed: int | None = None
    """Seed of the transfer text's order, and so of the rows a ``--transfer-rows`` cache holds (default: ``--seed``).
    Runs of several seeds given one transfer seed read the same transfer rows and share one cache (the teacher
    labels them once); each seed still has its own student initialisation, cycling order over the cached rows,
    labelled-batch order and dropout."""
    name: str | None = None
    """Model name in result.json (default: the run directory's name)."""
    num_workers: int = 1
    """DataLoader workers per rank reading the transfer shards."""
    save_every: int = 50
    """Checkpoint every this many optimizer steps (and at every sub-stage's end)."""
    log_every: int = 10
    """Print the sub-stage, its step and the mean loss since the last line every this many optimizer steps."""
    threads: int | None = None
    """torch CPU threads per rank (default: torch's)."""
    resume: bool = False
    """Continue an unfinished run from its checkpoint, on any number of ranks (same global batches)."""
    overwrite: bool = False
    """Start over when ``out`` holds a run."""

    @property
    def transfer_order_seed(self) -> int:
        """The seed of the transfer text's order: ``transfer_seed``, else ``seed``."""
        return self.seed if self.transfer_seed is None else self.transfer_seed

    def __post_init__(self) -> None:
        check_distill_task(self.task, self.data)
        if self.recipe != "xtremedistil":
            raise UsageError(f"--recipe {self.recipe!r}: the only recipe is xtremedistil")
        if self.embeddings not in EMBEDDINGS:
            raise UsageError(f"--embeddings must be one of {', '.join(EMBEDDINGS)}, got {self.embeddings!r}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise UsageError(f"--stages takes some of {', '.join(STAGES)}, got {list(self.stages)}")
        if self.transfer_rows < 0:
            raise UsageError(f"--transfer-rows must be 0 (the teacher online) or a number of rows, got "
                             f"{self.transfer_rows}")
        for name in ("transfer_batch", "label_batch", "eval_every", "patience", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.temperature is not None and self.temperature <= 0:
            raise UsageError(f"--temperature must be positive, got {self.temperature}")
