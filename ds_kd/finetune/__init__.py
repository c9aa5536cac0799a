"""Fine-tuning and zero-shot evaluation (paper §4): task heads, the mTOP pointer decoder and the single job.

- ``data``: records -> encoder ids (first-sub-word labels, pair segments, mTOP pointer targets).
- ``heads``: ``TaskModel`` (one module; the head follows the task kind), ``TaskOutput``, save/load.
- ``pointer``: the mTOP ``PointerDecoder`` with batched beam search.
- ``loop``: ``train_epoch`` with a swappable ``loss_fn(model, batch)``, ``predict``, ``evaluate``.
- ``config``: ``FinetuneConfig``, a job's settings (no torch: the command lines' ``--help`` reads it).
- ``job``: ``run(cfg) -> FinetuneResult`` (writes ``result.json``).
- ``metrics``: accuracy, span F1, intent/slot scores, logical-form exact match.
- ``state``: a job's settings, the re-run rule on its directory, per-epoch checkpoints for ``--resume``.
"""
import importlib

EXPORTS = {
    "data": ["TaskLabels", "build_labels", "collate", "encode_records"],
    "heads": ["TaskModel", "TaskOutput", "freeze_embeddings", "load_task_model", "save_task_model"],
    "config": ["FinetuneConfig"],
    "job": ["FinetuneResult", "read_result", "run"],
    "loop": ["evaluate", "predict", "task_loss", "train_epoch"],
}
"""Module of each name the package exports, imported when the name is first used (PEP 562): importing one light
module of the package, such as ``config`` for a command's ``--help``, does not import torch."""
__all__ = [name for names in EXPORTS.values() for name in names]


def __getattr__(name: str):
    for module, names in EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"ds_kd.finetune.{module}"), name)
    raise AttributeError(f"module 'ds_kd.finetune' has no attribute {name!r}")
