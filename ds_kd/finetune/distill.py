"""Distillation during fine-tuning (``ft-distill``, the paper's second stage, §3.2 and §4.2).

A teacher already fine-tuned on the task's English data (a grid job saved with ``--save-model``, or fine-tuned
here first) stays frozen while the student trains on the same English data with

    loss = w_task * task loss
         + w_output * soft cross-entropy of the student's task logits against the teacher's (temperature T)
         + w_embedding * embedding MSE + w_hidden * hidden-state MSE + w_attention * attention-score MSE

The loss terms are the first stage's own functions (``ds_kd.distill.losses`` through
``ds_kd.distill.module.intermediate_terms``), with the same layer map and projections (``layer_map``,
``build_projections``); the weights and temperature are a ``DistillConfig``, whose ``mlm_weight`` weighs the
student's own task loss here (the hard-label term that MLM is in the first stage).

The output term covers every logits entry of ``TaskOutput`` at its mask, summed like the task loss is:
``classes`` (XNLI, PAWS-X), ``tags`` at word starts (WikiANN), ``intents`` + ``tags`` (MultiATIS++) and, for
mTOP, ``parse``: the decoder's distribution over ontology tokens and pointers at every real target step (the
student is teacher-forced on the gold form, like the teacher). The intermediate terms distil the encoder.

Training, dev selection, testing and ``result.json`` are the plain job's (``prepare``/``fit``/``test_and_write``);
``<out>/distill.json`` (teacher, weights, layer map) is written before ``result.json``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ds_kd.distill.losses import layer_map, soft_cross_entropy
from ds_kd.distill.module import DistillConfig, build_projections, intermediate_terms
from ds_kd.errors import UsageError
from ds_kd.finetune.heads import TASK_MODEL_JSON, TaskModel, load_task_model, save_task_model
from ds_kd.finetune import state
from ds_kd.finetune.job import (RESULT, FinetuneConfig, FinetuneResult, Job, fit, prepare, result_from_dict, run,
                                test_and_write)
from ds_kd.finetune.loop import LossFn
from ds_kd.manifest import atomic_write_text
from ds_kd.models.modeldir import load_tokenizer

DISTILL_JSON = "distill.json"
TEACHER_ONLY_KEYS = ("labels", "intent_labels", "target_out")  # targets: the teacher needs inputs only


def ft_distill_loss(student: TaskModel, batch: dict[str, torch.Tensor], teacher: TaskModel, config: DistillConfig,
                    mapped_layers: list[int], projections: nn.ModuleDict) -> tuple[torch.Tensor, dict[str, float]]:
    """One ft-distill step's loss and its unweighted terms (``task``, ``output``, ``embedding``, ``hidden``,
    ``attention``) plus ``loss`` (the weighted total), as floats for the epoch log.

    A zero weight skips its term; the teacher is not run when only the task loss is left."""
    want_hidden = config.embedding_weight > 0 or config.hidden_weight > 0
    want_scores = config.attention_weight > 0
    out = student(**batch, output_hidden_states=want_hidden, output_attention_scores=want_scores)
    terms: dict[str, torch.Tensor] = {}
    if config.mlm_weight > 0:
        terms["task"] = out.loss
    if config.output_weight > 0 or want_hidden or want_scores:
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k not in TEACHER_ONLY_KEYS}
            ref = teacher(**inputs, output_hidden_states=want_hidden, output_attention_scores=want_scores)
        if config.output_weight > 0:
            terms["output"] = sum(soft_cross_entropy(out.logits[k][out.masks[k]], ref.logits[k][out.masks[k]],
                                                     config.temperature) for k in out.logits)
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(batch["input_ids"])
        terms.update(intermediate_terms(out.encoder, ref.encoder, attention_mask, mapped_layers, projections,
                                        config))
    weights = {"task": config.mlm_weight, "output": config.output_weight, "embedding": config.embedding_weight,
               "hidden": config.hidden_weight, "attention": config.attention_weight}
    loss = sum(weights[name] * value for name, value in terms.items())
    logs = {name: float(value.detach()) for name, value in terms.items()}
    logs["loss"] = float(loss.detach())
    return loss, logs


def teacher_model_dir(teacher: str | Path | FinetuneConfig) -> Path:
    """The saved task-model directory of ``teacher``: a task-model directory itself, a job directory holding
    ``model/`` (a grid job run with ``--save-model``), or a ``FinetuneConfig`` fine-tuned here first (skipped
    when its ``result.json`` and ``model/`` already exist)."""
    if isinstance(teacher, FinetuneConfig):
        out = Path(teacher.out)
        if not ((out / RESULT).is_file() and (out / "model" / TASK_MODEL_JSON).is_file()):
            run(replace(teacher, save_model=True))
        return out / "model"
    path = Path(teacher)
    for candidate in (path, path / "model"):
        if (candidate / TASK_MODEL_JSON).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no fine-tuned teacher here (expected {TASK_MODEL_JSON} in it or in its "
                            f"model/ folder; fine-tune the teacher with --save-model first)")


def load_teacher(directory: Path, job: Job) -> TaskModel:
    """The frozen teacher on the job's device, after checking it was fine-tuned for the same task with the same
    labels and vocabulary (the student's encoded batches are fed to it unchanged)."""
    teacher, meta = load_task_model(directory)
    problems = []
    if meta.get("task") not in (None, job.spec.name):
        problems.append(f"it was fine-tuned on {meta.get('task')!r}, not {job.spec.name!r}")
    if meta["labels"] != job.data.labels.to_dict():
        problems.append("its label sets differ from the student's (different English training data?)")
    if teacher.encoder.config.vocab_size < job.model.encoder.config.vocab_size:  # more rows: padding, never used
        problems.append(f"its vocabulary has {teacher.encoder.config.vocab_size} entries, fewer than the student's "
                        f"{job.model.encoder.config.vocab_size}")
    elif load_tokenizer(directory, "ft-distill (the teacher)").get_vocab() != job.tokenizer.get_vocab():
        problems.append("its tokenizer differs from the student's")
    if problems:
        raise UsageError(f"{directory}: cannot distil from this teacher: " + "; ".join(problems))
    teacher.requires_grad_(False)
    return teacher.to(job.device).eval()


def run_ft_distill(cfg: FinetuneConfig, teacher: str | Path | FinetuneConfig,
                   distill_cfg: DistillConfig | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on the task with ft-distill from ``teacher`` (see ``teacher_model_dir``);
    writes ``<out>/distill.json`` then ``<out>/result.json`` like a plain job."""
    distill_cfg = distill_cfg or DistillConfig()
    directory = teacher_model_dir(teacher)
    settings = state.job_settings(cfg, distill_settings(directory, distill_cfg))
    if (saved := state.check_out(cfg, settings, "ft-distill job")) is not None:
        return result_from_dict(saved)
    job, loss_fn, extra = prepare_ft_distill(cfg, settings, directory, distill_cfg)
    return test_and_write(job, *fit(job, loss_fn, extra))


def distill_settings(directory: Path, distill_cfg: DistillConfig) -> dict:
    """The settings ft-distill adds to a job's: the teacher and the loss configuration."""
    return {"teacher": str(directory.resolve()), "distill": asdict(distill_cfg)}


def prepare_ft_distill(cfg: FinetuneConfig, settings: dict, directory: Path, distill_cfg: DistillConfig
                       ) -> tuple[Job, LossFn, list[nn.Parameter]]:
    """The prepared job, its ft-distill loss against the teacher in ``directory`` and the projections that
    train beside the student; ``<out>/distill.json`` is written."""
    job = prepare(cfg, settings)
    teacher_model = load_teacher(directory, job)
    s_cfg, t_cfg = job.model.encoder.config, teacher_model.encoder.config
    mapped = layer_map(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers, distill_cfg.layer_map)
    projections = build_projections(s_cfg.hidden_size, t_cfg.hidden_size, s_cfg.num_hidden_layers, distill_cfg,
                                    s_cfg.initializer_range).to(job.device)
    loss_fn = functools.partial(ft_distill_loss, teacher=teacher_model, config=distill_cfg, mapped_layers=mapped,
                                projections=projections)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / DISTILL_JSON, json.dumps(
        {"teacher": str(directory), "config": asdict(distill_cfg), "layer_map": mapped,
         "projections": sorted(projections.keys()), "task_weight": distill_cfg.mlm_weight}, indent=2) + "\n")
    print(f"[ft-distill] {cfg.task}: teacher {directory} ({t_cfg.num_hidden_layers} layers) -> student "
          f"{s_cfg.num_hidden_layers} layers, layer map {mapped}", flush=True)
    return job, loss_fn, list(projections.parameters())


def restrict_task_model(teacher_dir: str | Path, tokenizer_dir: str | Path, out: str | Path) -> Path:
    """A fine-tuned task model (``teacher_dir``) with its word embeddings restricted to the vocabulary of the
    tokenizer in ``tokenizer_dir`` (a pair-trimmed student's, BiStil's phase 2): row ``i`` is the teacher's row
    of the student's piece ``i`` (same string), written with that tokenizer to ``out``. On text the trimmed
    tokenizer spells with its pieces (the pair's, ``python -m data_prep trim_vocab``) it gives the full
    teacher's outputs, and ft-distill accepts it for the student. Raises UsageError naming a piece the teacher
    lacks."""
    teacher, meta = load_task_model(teacher_dir)
    full = load_tokenizer(teacher_dir, "the task teacher").get_vocab()
    small_tokenizer = load_tokenizer(tokenizer_dir, "the student's vocabulary")
    small = small_tokenizer.get_vocab()
    missing = [piece for piece in small if piece not in full]
    if missing:
        raise UsageError(f"{tokenizer_dir}: {len(missing)} pieces (e.g. {missing[:3]}) are not in {teacher_dir}'s "
                         f"vocabulary: give the tokenizer trimmed from this teacher's")
    rows = torch.tensor([full[piece] for piece, _ in sorted(small.items(), key=lambda kv: kv[1])])
    embeddings = teacher.encoder.embeddings.word_embeddings
    restricted = nn.Embedding(len(rows), embeddings.weight.shape[1], padding_idx=None)
    with torch.no_grad():
        restricted.weight.copy_(embeddings.weight[rows])
    teacher.encoder.embeddings.word_embeddings = restricted
    teacher.encoder.config = replace(teacher.encoder.config, vocab_size=len(rows))
    save_task_model(teacher, out, small_tokenizer, **{k: v for k, v in meta.items()
                                                     if k not in ("kind", "labels", "head", "segment_ids_trained",
                                                                  "encoder_config")})
    return Path(out)
