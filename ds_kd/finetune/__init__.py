"""Fine-tuning and zero-shot evaluation (paper §4): task heads, the mTOP pointer decoder and the single job.

- ``data``: records -> encoder ids (first-sub-word labels, pair segments, mTOP pointer targets).
- ``heads``: ``TaskModel`` (one module; the head follows the task kind), ``TaskOutput``, save/load.
- ``pointer``: the mTOP ``PointerDecoder`` with batched beam search.
- ``loop``: ``train_epoch`` with a swappable ``loss_fn(model, batch)``, ``predict``, ``evaluate``.
- ``job``: ``FinetuneConfig`` and ``run(cfg) -> FinetuneResult`` (writes ``result.json``).
- ``metrics``: accuracy, span F1, intent/slot scores, logical-form exact match.
- ``state``: a job's settings, the re-run rule on its directory, per-epoch checkpoints for ``--resume``.
"""
from ds_kd.finetune.data import TaskLabels, build_labels, collate, encode_records
from ds_kd.finetune.heads import TaskModel, TaskOutput, freeze_embeddings, load_task_model, save_task_model
from ds_kd.finetune.job import FinetuneConfig, FinetuneResult, read_result, run
from ds_kd.finetune.loop import evaluate, predict, task_loss, train_epoch

__all__ = ["TaskLabels", "build_labels", "collate", "encode_records", "TaskModel", "TaskOutput",
           "freeze_embeddings", "load_task_model", "save_task_model", "FinetuneConfig", "FinetuneResult",
           "read_result", "run", "evaluate", "predict", "task_loss", "train_epoch"]
