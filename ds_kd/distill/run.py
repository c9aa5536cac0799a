"""Online distillation in one DeepSpeed engine: ``run(DistillRunConfig) -> RunResult``.

The engine holds a :class:`~ds_kd.distill.module.Distiller`: the frozen teacher (half precision, no
gradients, never in the optimizer), the student and the projections. Everything else (reader, loop,
checkpoints, validation, export, logging) is :func:`ds_kd.train.training.run_stage`, shared with pretraining.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ds_kd.train import engine as dist
from ds_kd.distill.module import DistillConfig, Distiller
from ds_kd.errors import UsageError
from ds_kd.train.loop import NonFiniteLossError
from ds_kd.models.model import BertConfig, BertForMaskedLM
from ds_kd.train.training import (CorpusData, EngineSetup, Job, RunResult, StagePlan, TrainConfig, model_config,
                            run_stage)
from ds_kd.models.vocab_check import report_unknown, shard_unknown_rates
from ds_kd.models.warmstart import FROM_INIT, FROM_TEACHER, init_model

log = logging.getLogger("ds_kd")

TEACHER_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DistillRunConfig(TrainConfig):
    teacher: str = ""
    """Teacher directory: an export of ours or any HF BERT checkpoint (BertForMaskedLM or BertModel)."""
    student: str | None = None
    """Student preset (e.g. leanbert, or tiny-leanbert on CPU); from-init: the shape of ``init_from`` with
    ``len(init_layers)`` layers (DistilBERT's recipe when ``init_from`` is the teacher); from-teacher: the
    teacher's width, heads, FFN and positions with a third of its layers, at least 1 (12 -> 4, 6 -> 2). None:
    from-init with ``init_from``, else from-teacher (a shape that always fits the teacher)."""
    teacher_dtype: str = "auto"
    """Teacher precision: auto (fp16 where the accelerator has it, else bf16, else fp32), fp16, bf16 or fp32."""
    losses: DistillConfig = field(default_factory=DistillConfig)
    """Loss weights, temperature and layer map."""

    def __post_init__(self) -> None:
        self.student = self.student or (FROM_INIT if self.init_from else FROM_TEACHER)


def student_config(cfg: DistillRunConfig, data: CorpusData) -> BertConfig:
    """The student's config (:func:`ds_kd.train.training.model_config`), for from-teacher the teacher's config with
    ``max(1, layers // 3)`` layers. Raises UsageError for from-teacher with ``init_from`` (its weights would not
    fit: use from-init)."""
    if cfg.student != FROM_TEACHER:
        return model_config(cfg.student, data, cfg.init_from, cfg.init_layers)
    if cfg.init_from:
        raise UsageError(f"--student {FROM_TEACHER} is a fresh student; with --init-from use --student {FROM_INIT} "
                         f"(the shape of --init-from and --init-layers)")
    teacher = model_config(FROM_INIT, data, cfg.teacher, init_flag="--teacher")
    return replace(teacher, num_hidden_layers=max(1, teacher.num_hidden_layers // 3))


def resolve_teacher_dtype(requested: str, accel: str) -> torch.dtype:
    """fp16 on GPU; where fp16 is unsupported (CPU) fall back to bf16, then fp32, and say so."""
    if requested not in ("auto", *TEACHER_DTYPES):
        raise UsageError(f"unknown teacher dtype {requested!r}; known: auto, fp16, bf16, fp32")
    support = dist.half_precision_support(accel)
    want = "fp16" if requested == "auto" else requested
    if want in support and not support[want]:
        fallback = "bf16" if support["bf16"] else "fp32"
        log.warning("teacher in %s is not supported on %s: running it in %s", want, accel, fallback)
        want = fallback
    return TEACHER_DTYPES[want]


def teacher_digest(teacher: torch.nn.Module) -> str:
    """sha256 of the teacher's full weights (gathered under ZeRO-3), to prove it never changed."""
    return dist.replica_digests(teacher)[0]


def load_teacher(directory: str, data_vocab_size: int, shards_manifest: dict,
                 tokenizer_dir: Path) -> BertForMaskedLM:
    """The teacher checkpoint, checked against the shards: its embedding must have a row for every token id of
    the shards' tokenizer (``data_vocab_size``). More rows are fine (public checkpoints often pad the matrix,
    e.g. multilingual-e5-small: 250,037 rows for 250,002 pieces); those rows are never looked up, and the
    teacher's MLM logits are cut to the tokenizer's ids. Raises ValueError naming ``config.json`` when the
    embedding is smaller, or when the directory's tokenizer is not the shards' one (``tokenizer_dir``: the
    corpus's; :func:`ds_kd.schema.check_model_tokenizer`)."""
    from ds_kd.models.modeldir import load_tokenizer

    from ds_kd.schema import check_model_tokenizer

    directory = Path(directory)
    teacher = BertForMaskedLM.from_pretrained(directory)
    rows = teacher.config.vocab_size
    if rows < data_vocab_size:
        raise UsageError(f"{directory}/config.json: teacher vocabulary of {rows} tokens (embedding rows), fewer than "
                         f"the {data_vocab_size} of the tokenizer the shards were written with: distil on shards "
                         f"made with the teacher's tokenizer (python -m data_prep corpus --tokenizer {directory})")
    if rows > data_vocab_size:
        log.info("teacher embedding has %d rows for a %d-token tokenizer: the %d rows above are never used",
                 rows, data_vocab_size, rows - data_vocab_size)
    load_tokenizer(directory, "distillation (--teacher)")  # a teacher without its tokenizer, or another's, stops here
    check_model_tokenizer(directory, "--teacher", shards_manifest, tokenizer_dir)
    return teacher


def same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def default_layer_map(cfg: DistillRunConfig) -> DistillConfig:
    """The loss settings; a student started from chosen teacher layers is distilled against those same
    layers unless ``--layer-map`` says otherwise."""
    if cfg.init_layers and cfg.losses.layer_map is None and cfg.init_from and same_dir(cfg.init_from, cfg.teacher):
        log.info("layer map: the --init-layers %s (each student layer against the teacher layer it started from)",
                 cfg.init_layers)
        return replace(cfg.losses, layer_map=list(cfg.init_layers))
    return cfg.losses


def run(cfg: DistillRunConfig) -> RunResult:
    """Distil ``cfg.teacher`` into ``cfg.student`` (fresh, or started from ``cfg.init_from``); ``cfg.out``
    holding a run: see :func:`ds_kd.train.training.plan_out`. Raises ValueError for a teacher that does not fit the
    shards (see :func:`load_teacher`) or a bad student before any work. The unknown-token rate of every language
    of the validation shards is logged, with a warning above 1% naming the teacher (``ds_kd.models.vocab_check``)."""

    seen: dict = {}  # the Distiller and its last micro-batch: what tells whether a non-finite loss was the teacher's

    def plan(data: CorpusData) -> StagePlan:
        student_cfg = student_config(cfg, data)  # flags first: a student that cannot be built stops before any load
        teacher = load_teacher(cfg.teacher, data.vocab_size, data.manifest, data.tokenizer_dir)
        report_unknown(cfg.teacher, shard_unknown_rates(data.shard_dir, data.manifest), say=log.info)
        losses = default_layer_map(cfg)
        head_trained = losses.mlm_weight > 0 or (losses.output_weight > 0 and getattr(teacher, "has_mlm_head", True))
        if not head_trained:
            log.info("no validation perplexity: no loss trains the student's MLM head (--mlm-weight 0, and "
                     "--output-weight 0 or a teacher without an MLM head)")

        def build(setup: EngineSetup) -> Job:
            teacher_dtype = resolve_teacher_dtype(cfg.teacher_dtype, dist.accelerator_name())
            engine_dtype = dist.precision_dtype(setup.ds_config)
            if engine_dtype != torch.float32 and teacher_dtype != engine_dtype:
                # DeepSpeed casts the whole module, teacher included, to the engine's half precision.
                log.warning("the engine runs in %s, so the teacher does too (not %s)", engine_dtype, teacher_dtype)
                teacher_dtype = engine_dtype
            student, init = BertForMaskedLM(student_cfg), None
            if cfg.init_from:  # before the Distiller casts the teacher to half precision
                source = (teacher if same_dir(cfg.init_from, cfg.teacher)
                          else BertForMaskedLM.from_pretrained(cfg.init_from))
                init = init_model(student, source, cfg.init_layers)
            distiller = Distiller(teacher, student, losses, teacher_dtype)
            before = teacher_digest(distiller.teacher)
            summary = distiller.summary()
            log.info("distillation: %s", summary)

            seen["distiller"] = distiller

            def step(engine, batch, denominators):
                seen["batch"] = batch
                out = engine(batch, denominators)
                return out.loss, {k: v for k, v in out.terms.items() if k != "total"}

            def check_teacher() -> dict:
                after = teacher_digest(distiller.teacher)
                if after != before:
                    raise RuntimeError(f"the teacher's weights changed during distillation ({before} -> {after})")
                return {"teacher_digest_after": after}

            manifest = {"teacher": str(Path(cfg.teacher).resolve()), "student": cfg.student,
                        "student_config": asdict(student_cfg), "init": init, "distillation": summary,
                        "teacher_digest": before}
            return Job(distiller, step, distiller.student, manifest, check_teacher, {"teacher_digest": before},
                       perplexity=head_trained)

        return StagePlan({"teacher": teacher.config, "student": student_cfg}, build)

    try:
        return run_stage(cfg, "distill", "distillation",
                         {"teacher": str(Path(cfg.teacher).resolve()), "student": cfg.student,
                          "teacher_dtype": cfg.teacher_dtype, "losses": asdict(cfg.losses)}, plan,
                         {FROM_INIT: cfg.init_from, FROM_TEACHER: cfg.teacher}.get(cfg.student, cfg.student))
    except NonFiniteLossError as error:
        if (message := teacher_overflow(seen["distiller"], seen["batch"])) is not None:
            raise NonFiniteLossError(message) from error
        raise


def teacher_overflow(distiller: Distiller, batch: dict) -> str | None:
    """After a non-finite loss (every rank calls this, together): the one-line message naming the teacher as the
    cause, and what to do, when its outputs on ``batch`` (the last micro-batch) are not finite on some rank;
    None when they all are (the loss went non-finite elsewhere)."""
    where = distiller.first_nonfinite_teacher_output(batch)
    if not dist.all_reduce(torch.tensor(float(where is not None), device=dist.device()), "max").item():
        return None
    dtype = str(next(distiller.teacher.parameters()).dtype).replace("torch.", "")
    found = f"from its {where} on" if where else "on another rank"
    if dtype != "float16":
        return f"non-finite loss from the teacher: its {dtype} outputs are not finite ({found}); check the " \
               f"teacher's weights (--teacher)"
    engine_fp16 = any(p.dtype == torch.float16 for p in distiller.student.parameters())
    fix = ("the fp16 DeepSpeed config casts the teacher too: start again with a bf16 or fp32 config "
           "(--ds-override fp16.enabled=false) and --overwrite" if engine_fp16 else
           "start again with --teacher-dtype bf16 (or fp32) and --overwrite (a resume keeps the run's teacher "
           "precision)")
    return (f"non-finite loss from the teacher: it overflowed in fp16 (activations past ±65504; its outputs are "
            f"not finite {found}), not the student, the learning rate or the data; {fix}")
