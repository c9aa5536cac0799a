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
from ds_kd.distill.bistil import PROJECTION_FILE, FixedProjection, bistil_layer_maps, svd_embeddings
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
EMBEDDING_INITS = ("default", "svd")
PROJECTIONS = ("learned", "fixed")


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
    depth_divisor: int = 3
    """from-teacher: the student gets the teacher's layers divided by this, at least 1 (BiStil: 2, 12 -> 6)."""
    student_dropout: float | None = None
    """Dropout of the student (hidden and attention); None: its shape's (BiStil: 0)."""
    embedding_init: str = "default"
    """The student's word embeddings: ``default`` (random for a fresh student, copied with ``init_from``) or
    ``svd`` (the teacher's first left singular vectors, BiStil; :func:`ds_kd.distill.bistil.svd_embeddings`)."""
    projection: str = "learned"
    """Where the widths differ: ``learned`` student-side projections trained with the student (TinyBERT) or a
    ``fixed`` SVD projection of the teacher's states, computed once from held-out states (BiStil)."""
    projection_sentences: int = 1024
    """Validation sentences whose teacher states (every real token) give the fixed projection."""

    def __post_init__(self) -> None:
        self.student = self.student or (FROM_INIT if self.init_from else FROM_TEACHER)
        if self.depth_divisor < 1 or self.projection_sentences < 1:
            raise UsageError(f"--depth-divisor and --projection-sentences must be at least 1, got "
                             f"{self.depth_divisor} and {self.projection_sentences}")
        if self.student_dropout is not None and not 0 <= self.student_dropout < 1:
            raise UsageError(f"--student-dropout must be in [0, 1), got {self.student_dropout}")
        if self.embedding_init not in EMBEDDING_INITS or self.projection not in PROJECTIONS:
            raise UsageError(f"--embedding-init must be one of {', '.join(EMBEDDING_INITS)} and --projection one of "
                             f"{', '.join(PROJECTIONS)}; got {self.embedding_init!r} and {self.projection!r}")
        if self.losses.attention_target == "probabilities" and self.packing:
            raise UsageError("--attention-target probabilities compares one sentence per row: add --packing off")
        if self.embedding_init == "svd" and self.init_from:
            raise UsageError("--embedding-init svd starts the student's word embeddings from the teacher's SVD; "
                             "--init-from copies them: add --embedding-init default, or drop --init-from")


def student_config(cfg: DistillRunConfig, data: CorpusData) -> BertConfig:
    """The student's config (:func:`ds_kd.train.training.model_config`), for from-teacher the teacher's config with
    ``max(1, layers // depth_divisor)`` layers; ``student_dropout`` replaces its dropout. Raises UsageError for
    from-teacher with ``init_from`` (its weights would not fit: use from-init)."""
    if cfg.student != FROM_TEACHER:
        shape = model_config(cfg.student, data, cfg.init_from, cfg.init_layers)
    elif cfg.init_from:
        raise UsageError(f"--student {FROM_TEACHER} is a fresh student; with --init-from use --student {FROM_INIT} "
                         f"(the shape of --init-from and --init-layers)")
    else:
        teacher = model_config(FROM_INIT, data, cfg.teacher, init_flag="--teacher")
        shape = replace(teacher, num_hidden_layers=max(1, teacher.num_hidden_layers // cfg.depth_divisor))
    if cfg.student_dropout is None:
        return shape
    return replace(shape, hidden_dropout_prob=cfg.student_dropout, attention_probs_dropout_prob=cfg.student_dropout)


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
            if cfg.embedding_init == "svd":
                init = svd_init(student, teacher)
            projection = fixed_projection(cfg, data, teacher, student_cfg, losses)
            distiller = Distiller(teacher, student, losses, teacher_dtype, projection)
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
                        **({"fixed_projection": {"file": PROJECTION_FILE, "sha256": projection.digest()}}
                           if projection is not None else {}),
                        "student_config": asdict(student_cfg), "init": init, "distillation": summary,
                        "teacher_digest": before}
            return Job(distiller, step, distiller.student, manifest, check_teacher, {"teacher_digest": before},
                       perplexity=head_trained)

        return StagePlan({"teacher": teacher.config, "student": student_cfg}, build)

    try:
        return run_stage(cfg, "distill", "distillation", stage_settings(cfg), plan,
                         {FROM_INIT: cfg.init_from, FROM_TEACHER: cfg.teacher}.get(cfg.student, cfg.student))
    except NonFiniteLossError as error:
        if (message := teacher_overflow(seen["distiller"], seen["batch"])) is not None:
            raise NonFiniteLossError(message) from error
        raise


def stage_settings(cfg: DistillRunConfig) -> dict:
    """What a re-run compares beside the training settings; settings added with BiStil are recorded only where
    they differ from their defaults, so runs from before them still match."""
    later = {"depth_divisor": 3, "student_dropout": None, "embedding_init": "default", "projection": "learned",
             "projection_sentences": 1024}
    later_losses = {"attention_target": "scores", "embeddings_in_hidden": False}
    losses = {k: v for k, v in asdict(cfg.losses).items() if k not in later_losses or v != later_losses[k]}
    return {"teacher": str(Path(cfg.teacher).resolve()), "student": cfg.student, "teacher_dtype": cfg.teacher_dtype,
            "losses": losses, **{k: getattr(cfg, k) for k, default in later.items() if getattr(cfg, k) != default}}


def svd_init(student: BertForMaskedLM, teacher: BertForMaskedLM) -> dict:
    """Start the student's word embeddings from the SVD of the teacher's (:func:`ds_kd.distill.bistil.svd_embeddings`,
    rows of the student's vocabulary), computed on rank 0 and sent to every rank (identical replicas whatever
    the ranks' linear algebra); returns what the manifest records."""
    rows, width = student.config.vocab_size, student.config.hidden_size
    teacher_VD = teacher.bert.embeddings.word_embeddings.weight[:rows]
    vectors = dist.broadcast_object(svd_embeddings(teacher_VD, width) if dist.is_main() else None)
    with torch.no_grad():
        student.bert.embeddings.word_embeddings.weight.copy_(vectors)
    log.info("student word embeddings: the first %d left singular vectors of the teacher's %d x %d", width, rows,
             teacher_VD.shape[1])
    return {"word_embeddings": f"svd of the teacher's, rank {width}"}


def fixed_projection(cfg: DistillRunConfig, data: CorpusData, teacher: BertForMaskedLM, student_cfg: BertConfig,
                     losses: DistillConfig) -> FixedProjection | None:
    """BiStil's fixed projection of the teacher's states where the widths differ and ``cfg.projection`` is
    ``fixed`` (None otherwise): the run's own file (:data:`ds_kd.distill.bistil.PROJECTION_FILE`) when it has one
    and is not started over, else fit on rank 0 from the validation split's teacher states (in full precision,
    before the teacher is cast), sent to every rank and written there."""
    if cfg.projection != "fixed" or teacher.config.hidden_size == student_cfg.hidden_size:
        return None
    path = Path(cfg.out) / PROJECTION_FILE
    if path.is_file() and not cfg.overwrite:
        log.info("fixed projection of the teacher's states: %s (written when the run started)", path)
        return FixedProjection.load(path)
    hidden, _ = bistil_layer_maps(teacher.config.num_hidden_layers, student_cfg.num_hidden_layers, losses.layer_map)
    indices = hidden if losses.embedding_weight > 0 or losses.embeddings_in_hidden else hidden[1:]
    matrices = None
    if dist.is_main():
        from ds_kd.data.reader import ReaderConfig, ShardReader

        val = ShardReader(ReaderConfig(shard_dir=str(data.shard_dir), split="val", micro_batch_size=32, seed=cfg.seed,
                                       num_workers=0, epochs=1, max_len=cfg.max_len))
        fitted = FixedProjection.fit(teacher, val, indices, student_cfg.hidden_size, cfg.projection_sentences)
        fitted.save(path)
        matrices = {g: getattr(fitted, f"p_{g}") for g in fitted.indices}
    projection = FixedProjection(dist.broadcast_object(matrices))
    log.info("fixed projection of the teacher's states %s to width %d from %d validation sentences: %s", indices,
             student_cfg.hidden_size, cfg.projection_sentences, path)
    return projection


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
