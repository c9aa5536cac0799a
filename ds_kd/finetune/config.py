"""The settings of one fine-tuning job (:class:`FinetuneConfig`), apart from the job so that the command lines
build their ``--help`` from it without importing torch (the job: :mod:`ds_kd.finetune.job`)."""
from __future__ import annotations

from dataclasses import dataclass

from ds_kd.data.tasks import get_task
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
    epochs (README: a sweep of 2e-5 to 1e-2 on generated and demo tasks; 1e-3 is the smallest value at which
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
