"""Training steps, prediction and scoring of a ``TaskModel`` (single device, plain PyTorch).

The step is a function ``loss_fn(model, batch) -> (loss, logs)``: plain fine-tuning uses ``task_loss``;
fine-tuning with distillation passes its own (task loss + soft cross-entropy on the teacher's task logits +
intermediate losses) to the same ``train_epoch``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ds_kd.finetune.data import EOS, Encoded, TaskLabels, collate
from ds_kd.finetune.heads import TaskModel
from ds_kd.finetune.metrics import score

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def task_loss(model: TaskModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The task's own cross-entropy."""
    out = model(**batch)
    return out.loss, {"loss": float(out.loss.detach())}


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; full precision elsewhere (CPU runs are the tests' and stay exact)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batches(examples: list[Encoded], kind: str, batch_size: int,
                 generator: torch.Generator | None = None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices, batch) pairs, collated lazily; shuffled with ``generator``, else in order."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    order = list(order)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        yield chunk, collate([examples[i] for i in chunk], kind)


def num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def train_epoch(model: nn.Module, examples: list[Encoded], kind: str, optimizer: torch.optim.Optimizer,
                scheduler, batch_size: int, generator: torch.Generator, device: torch.device,
                loss_fn: LossFn = task_loss, max_grad_norm: float = 1.0, bf16: bool = True,
                desc: str = "train") -> dict[str, float]:
    """One pass over ``examples`` in a seeded order; returns the mean of each logged value."""
    model.train()
    sums: dict[str, float] = {}
    total = num_batches(len(examples), batch_size)
    for _, batch in tqdm(make_batches(examples, kind, batch_size, generator), total=total, desc=desc,
                         leave=False, mininterval=2, disable=None):  # None: no bar off a terminal (a job's log)
        with autocast(device, bf16):
            loss, logs = loss_fn(model, to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / max(1, total) for k, v in sums.items()}


def _word_labels(values: list[int], num_words: int, names: tuple[str, ...]) -> list[str]:
    """Names for every word; words cut off by ``max_len`` are ``O``."""
    tags = [names[v] for v in values]
    return tags + ["O"] * (num_words - len(tags))


def logical_form(ids: list[int], record: dict, example: Encoded, labels: TaskLabels) -> str:
    vocab = labels.decoder_vocab
    word_at = {pos: i for i, pos in enumerate(example.word_starts)}
    out = []
    for tok in ids:
        if tok == EOS:
            break
        if tok < len(vocab):
            out.append(vocab[tok])
        else:
            out.append(record["tokens"][word_at[tok - len(vocab)]])
    return " ".join(out)


@torch.no_grad()
def predict(model: TaskModel, records: list[dict], examples: list[Encoded], batch_size: int,
            device: torch.device, beam_size: int = 1, bf16: bool = True, desc: str = "predict",
            max_steps: int | None = None) -> list:
    """One prediction per record in the shape ``ds_kd.finetune.metrics.score`` takes."""
    model.eval()
    kind, labels = model.kind, model.labels
    preds: list = [None] * len(records)
    batches = make_batches(examples, kind, batch_size)
    for indices, batch in tqdm(batches, total=num_batches(len(examples), batch_size), desc=desc, leave=False,
                               mininterval=2, disable=None):
        batch = to_device(batch, device)
        with autocast(device, bf16):
            if kind == "parse":
                decoded = model.decode(**batch, beam_size=beam_size, max_steps=max_steps)
                for i, ids in zip(indices, decoded):
                    preds[i] = logical_form(ids, records[i], examples[i], labels)
                continue
            out = model(**{k: v for k, v in batch.items() if k not in ("labels", "intent_labels")})
        for row, i in enumerate(indices):
            starts = examples[i].word_starts
            if kind == "pair":
                preds[i] = labels.classes[int(out.logits["classes"][row].argmax())]
            elif kind == "tagging":
                ids = out.logits["tags"][row, starts].argmax(-1).tolist()
                preds[i] = _word_labels(ids, len(records[i]["tokens"]), labels.tags)
            else:
                ids = out.logits["tags"][row, starts].argmax(-1).tolist()
                preds[i] = {"intent": labels.classes[int(out.logits["intents"][row].argmax())],
                            "slots": _word_labels(ids, len(records[i]["tokens"]), labels.tags)}
    return preds


def evaluate(model: TaskModel, records: list[dict], examples: list[Encoded], batch_size: int,
             device: torch.device, beam_size: int = 1, bf16: bool = True, desc: str = "eval",
             max_steps: int | None = None) -> dict[str, float]:
    """The task's metrics (``ds_kd.finetune.metrics.score``) on one split (``max_steps``: mTOP decoding limit)."""
    preds = predict(model, records, examples, batch_size, device, beam_size, bf16, desc, max_steps)
    if model.kind == "pair":  # labels are compared as strings, whatever type the file gave them
        records = [{**r, "label": str(r["label"])} for r in records]
    return score(model.kind, records, preds)
