"""One fine-tuning job (paper §4): train on English train, pick the best epoch on English dev, test every language.

``run(FinetuneConfig(...))`` writes ``<out>/result.json`` (atomically, last) and returns a ``FinetuneResult``.
Two zero-shot averages of the headline metric: the paper's (``zero_shot_avg_paper``, over
``ds_kd.data.tasks.zero_shot_langs(spec)`` that have test data: the paper's table languages but English and the
task's exclusions, e.g. PAWS-X ja), and the run's own (``zero_shot_avg``), over every non-English language
tested (PAWS-X ja included). After every epoch a checkpoint (``ds_kd.finetune.state``) lets ``resume`` continue
a killed job exactly.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ds_kd.errors import UsageError
from ds_kd.finetune import state
from ds_kd.finetune.config import FinetuneConfig
from ds_kd.finetune.data import Encoded, TaskLabels, build_labels, encode_records
from ds_kd.finetune.heads import TaskModel, freeze_embeddings, save_task_model
from ds_kd.finetune.loop import LossFn, evaluate, num_batches, task_loss, train_epoch
from ds_kd.manifest import atomic_write_text
from ds_kd.models.model import BertForMaskedLM, count_parameters
from ds_kd.models.modeldir import load_tokenizer, segment_ids_trained
from ds_kd.train.optim import LRSchedule
from ds_kd.data.tasks import TaskSpec, get_task, load_split, split_path, zero_shot_langs
from ds_kd.models.vocab_check import report_unknown, unknown_rate

RESULT = "result.json"
MAX_TARGET_LEN = 256  # the decoder's learned positions (TaskModel's default max_target_len)


@dataclass
class FinetuneResult:
    """The content of ``result.json``."""

    task: str
    model: str
    model_dir: str
    seed: int
    scores: dict[str, dict[str, float]]
    """Per test language, every metric of the task."""
    metric: str
    """The headline metric (``TaskSpec.metric``)."""
    en: float | None
    """English test, headline metric."""
    zero_shot_avg: float | None
    """This run's zero-shot average: mean headline metric over ``zero_shot_langs`` (None when empty)."""
    zero_shot_langs: list[str]
    """Every non-English test language of this run, the task's exclusions included (PAWS-X ja)."""
    zero_shot_avg_paper: float | None
    """The paper's zero-shot average: over ``zero_shot_langs_paper`` (what the report's tables show)."""
    zero_shot_langs_paper: list[str]
    """The paper's zero-shot languages of the task (``ds_kd.data.tasks.zero_shot_langs``) that were tested."""
    dev_best: float
    """Best English dev headline metric."""
    best_epoch: int
    """1-based epoch whose weights were tested."""
    dev_history: list[dict[str, float]]
    config: dict
    seconds: float
    num_params: int
    """Parameters of the whole task model (encoder and head)."""
    num_params_encoder_non_embedding: int
    num_train: int
    num_train_skipped: int
    """English training records left out (mTOP forms that copy a word cut off by ``max_len``, or longer than
    the decoder's 256 positions)."""
    device: str
    labels: dict = field(default_factory=dict)
    segment_ids_trained: bool = True
    """Whether the encoder learnt segment ids; if not, pairs were fed with segment 0 for both sentences."""
    threads: int = 0
    """torch CPU threads the job ran with."""
    settings: dict = field(default_factory=dict)
    """What determined this result (``ds_kd.finetune.state.job_settings``), compared when the job is re-run."""
    unknown_token_rates: dict[str, float] = field(default_factory=dict)
    """Per task-data file read: the share of its tokens unknown to the model's tokenizer (``ds_kd.models.vocab_check``;
    above 1% the job warned)."""
    sparse: dict | None = None
    """Lottery-ticket sparse fine-tuning (:mod:`ds_kd.finetune.ltsft`): density, K, body weights, the count of
    body weights that differ from the start and the sparse difference's file; None for dense fine-tuning."""


@dataclass
class JobData:
    """Encoded splits of one task."""

    labels: TaskLabels
    train: list[Encoded]
    dev: tuple[list[dict], list[Encoded]]
    tests: dict[str, tuple[list[dict], list[Encoded]]]
    num_train_skipped: int
    max_decode_steps: int | None = None
    """``parse``: decoding stops after this many steps (1.5 x the longest training form + 8)."""
    unknown_token_rates: dict[str, float] = field(default_factory=dict)
    """Per file read (train, dev, every test): share of its tokens unknown to the tokenizer (``ds_kd.models.vocab_check``)."""


def test_langs(root: Path | str, spec: TaskSpec) -> list[str]:
    """The task's test languages that have data, then any other test split present (sorted)."""
    present = [lang for lang in spec.test_langs if split_path(root, spec.name, "test", lang).is_file()]
    others = sorted(p.name.split(".")[1] for p in (Path(root) / spec.name).glob("test.*.jsonl"))
    return present + [lang for lang in others if lang not in present]


def load_job_data(cfg: FinetuneConfig, spec: TaskSpec, tokenizer) -> JobData:
    """Read and encode English train and dev and every test language; report each file's unknown-token rate
    (``ds_kd.models.vocab_check``: a warning above 1% names the model directory and the file)."""
    data = load_train_dev(cfg, spec, tokenizer, report=False)
    tests, rates = load_test_data(cfg, spec, tokenizer, data.labels, report=False)
    data.tests, data.unknown_token_rates = tests, {**data.unknown_token_rates, **rates}
    report_unknown(cfg.model, data.unknown_token_rates)
    return data


def load_train_dev(cfg: FinetuneConfig, spec: TaskSpec, tokenizer, report: bool = True) -> JobData:
    """English train and dev only (``tests`` left empty: a run that must not open a test file before its final
    evaluation reads them later with ``load_test_data``); ``report``: warn about unknown-token rates now."""
    train = load_split(cfg.data, spec.name, "train", "en")[: cfg.max_train_examples]
    labels = build_labels(spec.kind, train)
    encoded = encode_records(tokenizer, spec.kind, train, labels, cfg.max_len)
    usable = [e for e in encoded
              if spec.kind != "parse" or (e.target is not None and len(e.target) <= MAX_TARGET_LEN)]
    longest = max((len(e.target) for e in usable), default=0) if spec.kind == "parse" else 0
    rates = {str(split_path(cfg.data, spec.name, "train", "en")): file_unknown_rate(encoded, tokenizer)}
    dev_records = load_split(cfg.data, spec.name, "dev", "en")
    dev = encode_records(tokenizer, spec.kind, dev_records, labels, cfg.max_len)
    rates[str(split_path(cfg.data, spec.name, "dev", "en"))] = file_unknown_rate(dev, tokenizer)
    if report:
        report_unknown(cfg.model, rates)
    return JobData(labels, usable, (dev_records, dev), {}, len(encoded) - len(usable),
                   min(MAX_TARGET_LEN, int(1.5 * longest) + 8) if spec.kind == "parse" else None, rates)


def load_test_data(cfg: FinetuneConfig, spec: TaskSpec, tokenizer, labels: TaskLabels, report: bool = True
                   ) -> tuple[dict[str, tuple[list[dict], list[Encoded]]], dict[str, float]]:
    """Every test language's (records, encoded examples) and each file's unknown-token rate."""
    tests, rates = {}, {}
    for lang in test_langs(cfg.data, spec):
        records = load_split(cfg.data, spec.name, "test", lang)
        tests[lang] = records, encode_records(tokenizer, spec.kind, records, labels, cfg.max_len)
        rates[str(split_path(cfg.data, spec.name, "test", lang))] = file_unknown_rate(tests[lang][1], tokenizer)
    if report:
        report_unknown(cfg.model, rates)
    return tests, rates


def file_unknown_rate(examples: list[Encoded], tokenizer) -> float:
    """The share of the examples' tokens unknown to ``tokenizer`` (``ds_kd.models.vocab_check.unknown_rate``)."""
    return unknown_rate((e.input_ids for e in examples), tokenizer.unk_token_id, tokenizer.all_special_ids)


def build_optimizer(model: TaskModel, cfg: FinetuneConfig, num_steps: int, extra: list[nn.Parameter] = ()):
    """AdamW with an encoder group and a head group (``head_lr``), linear warm-up then linear decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for lr, params in ((cfg.lr, [(n, p) for n, p in named if n.startswith("encoder.")]),
                       (cfg.head_lr, [(n, p) for n, p in named if not n.startswith("encoder.")]
                        + [(f"extra.{i}", p) for i, p in enumerate(extra)])):
        no_decay = lambda n, p: p.ndim < 2 or "LayerNorm" in n or ".norm" in n  # noqa: E731
        groups.append({"params": [p for n, p in params if not no_decay(n, p)], "lr": lr,
                       "weight_decay": cfg.weight_decay})
        groups.append({"params": [p for n, p in params if no_decay(n, p)], "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    schedule = LRSchedule(int(cfg.warmup_ratio * num_steps), num_steps, "linear")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_model(cfg: FinetuneConfig, spec: TaskSpec, labels: TaskLabels) -> TaskModel:
    encoder = BertForMaskedLM.from_pretrained(cfg.model).bert
    if cfg.max_len > encoder.config.max_position_embeddings:
        raise UsageError(f"--max-len {cfg.max_len} exceeds the encoder's {encoder.config.max_position_embeddings} "
                         f"positions ({cfg.model}/config.json)")
    model = TaskModel(encoder, spec.kind, labels, segment_ids_trained=segment_ids_trained(cfg.model))
    if not cfg.unfreeze_embeddings:
        freeze_embeddings(model)
    return model


@dataclass
class Job:
    """A prepared job: what ``fit`` and ``test_and_write`` work on (a distillation job adds its teacher)."""

    cfg: FinetuneConfig
    spec: TaskSpec
    device: torch.device
    tokenizer: object
    data: JobData
    model: TaskModel
    generator: torch.Generator
    started: float
    settings: dict = field(default_factory=dict)
    """What determines the result (``state.job_settings``): recorded in checkpoints and ``result.json``."""


def prepare(cfg: FinetuneConfig, settings: dict | None = None) -> Job:
    """Check the model directory, seed, read and encode the task data, build the model on its device."""
    started = time.time()
    spec = get_task(cfg.task, cfg.data)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg.model, "fine-tuning (--model)")
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_job_data(cfg, spec, tokenizer)
    if not data.train:
        raise UsageError(f"{split_path(cfg.data, spec.name, 'train', 'en')}: no usable training records")
    model = build_model(cfg, spec, data.labels).to(device)
    return Job(cfg, spec, device, tokenizer, data, model, generator, started,
               settings if settings is not None else state.job_settings(cfg))


def score_split(job: Job, records: list[dict], examples: list[Encoded], desc: str) -> dict[str, float]:
    cfg = job.cfg
    return evaluate(job.model, records, examples, cfg.eval_batch_size, job.device, cfg.beam_size, cfg.bf16, desc,
                    max_steps=job.data.max_decode_steps)


def fit(job: Job, loss_fn: LossFn = task_loss, extra_parameters: list[nn.Parameter] = (),
        configure: Callable[[torch.optim.Optimizer], None] | None = None) -> tuple[int, float, list]:
    """Train ``cfg.epochs`` epochs with ``loss_fn`` (``extra_parameters``, e.g. distillation projections, train
    at the head's rate), scoring English dev after each and checkpointing (``state.save``); the best epoch's
    weights are restored (kept in CPU memory). With ``cfg.resume`` it continues from the last checkpoint.
    ``configure`` gets the optimizer once it is built (e.g. to hook its steps). Returns (best epoch, its dev
    score, per-epoch history)."""
    cfg, model, data = job.cfg, job.model, job.data
    out, extra = Path(cfg.out), list(extra_parameters)
    num_steps = cfg.epochs * num_batches(len(data.train), cfg.batch_size)
    optimizer, scheduler = build_optimizer(model, cfg, num_steps, extra)
    if configure is not None:
        configure(optimizer)
    done, best_epoch, best_score, best_state, history = 0, 0, float("-inf"), None, []
    if cfg.resume and (saved := state.load(out, model, optimizer, scheduler, job.generator, extra)) is not None:
        done, history = saved["epoch"], saved["history"]
        best_epoch, best_score, best_state = saved["best_epoch"], saved["best_score"], saved["best_state"]
    for epoch in range(done + 1, cfg.epochs + 1):
        logs = train_epoch(model, data.train, job.spec.kind, optimizer, scheduler, cfg.batch_size, job.generator,
                           job.device, loss_fn, cfg.max_grad_norm, cfg.bf16, desc=f"epoch {epoch}/{cfg.epochs}")
        dev = score_split(job, *data.dev, desc="dev en")
        history.append({"epoch": epoch, **logs, **{f"dev_{k}": v for k, v in dev.items()}})
        print(f"[finetune] {cfg.task} epoch {epoch}: loss {logs.get('loss', float('nan')):.4f} "
              f"dev {job.spec.metric} {dev[job.spec.metric]:.4f}", flush=True)
        improved = dev[job.spec.metric] > best_score
        if improved:
            best_epoch, best_score = epoch, dev[job.spec.metric]
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        state.save(out, job.settings, epoch, model, optimizer, scheduler, job.generator, extra,
                   {"history": history, "best_epoch": best_epoch, "best_score": best_score},
                   (lambda d: save_model_dir(job, d)) if improved else None)
    model.load_state_dict(best_state)
    return best_epoch, best_score, history


def save_model_dir(job: Job, directory: Path) -> None:
    """The job's task model as it is now, with its tokenizer (``load_task_model`` reads it)."""
    save_task_model(job.model, directory, job.tokenizer, task=job.spec.name, source_model=str(job.cfg.model),
                    seed=job.cfg.seed, max_len=job.cfg.max_len, max_decode_steps=job.data.max_decode_steps)


def test_and_write(job: Job, best_epoch: int, dev_best: float, history: list,
                   sparse: dict | None = None) -> FinetuneResult:
    """Score every test language, write ``<out>/result.json`` last (and ``<out>/model`` when asked); ``sparse``:
    the LT-SFT facts recorded in it."""
    cfg, spec, model = job.cfg, job.spec, job.model
    scores = {lang: score_split(job, records, examples, desc=f"test {lang}")
              for lang, (records, examples) in job.data.tests.items()}
    paper_langs, run_langs = zero_shot_split(spec, list(scores))

    def average(langs: list[str]) -> float | None:
        return sum(scores[lang][spec.metric] for lang in langs) / len(langs) if langs else None

    result = FinetuneResult(
        task=spec.name, model=cfg.name or run_name(cfg.model), model_dir=str(cfg.model), seed=cfg.seed,
        scores=scores, metric=spec.metric, en=scores["en"][spec.metric] if "en" in scores else None,
        zero_shot_avg=average(run_langs), zero_shot_langs=run_langs, zero_shot_avg_paper=average(paper_langs),
        zero_shot_langs_paper=paper_langs, dev_best=dev_best,
        best_epoch=best_epoch, dev_history=history, config=asdict(cfg), seconds=0.0,
        num_params=sum(p.numel() for p in model.parameters()),
        num_params_encoder_non_embedding=count_parameters(model.encoder, with_embeddings=False),
        num_train=len(job.data.train), num_train_skipped=job.data.num_train_skipped, device=str(job.device),
        labels=job.data.labels.to_dict(), segment_ids_trained=model.segment_ids_trained,
        threads=torch.get_num_threads(), settings=job.settings, unknown_token_rates=job.data.unknown_token_rates,
        sparse=sparse)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.save_model:
        save_model_dir(job, out / "model")
    result.seconds = round(time.time() - job.started, 3)
    atomic_write_text(out / RESULT, json.dumps(asdict(result), indent=2, default=str) + "\n")
    state.remove(out)
    return result


def run_name(model_dir: str) -> str:
    """The default name of a model: the run's for ``<run>/export`` (``runs/mLeanBERT/export`` -> ``mLeanBERT``),
    else the directory's own name."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "export" else path.name


def zero_shot_split(spec: TaskSpec, tested: list[str]) -> tuple[list[str], list[str]]:
    """(the paper's zero-shot languages that were tested: the task's exclusions left out, as the paper; this
    run's: every tested language but English, in ``tested``'s order, exclusions included)."""
    return [lang for lang in zero_shot_langs(spec) if lang in tested], [lang for lang in tested if lang != "en"]


def run(cfg: FinetuneConfig, loss_fn: LossFn = task_loss) -> FinetuneResult:
    """Fine-tune on English train, select on English dev, test every language, write ``<out>/result.json``.
    ``cfg.out`` holding a job: ``state.check_out``'s rule (the saved result is returned when it is skipped)."""
    settings = state.job_settings(cfg)
    if (saved := state.check_out(cfg, settings)) is not None:
        return result_from_dict(saved)
    job = prepare(cfg, settings)
    return test_and_write(job, *fit(job, loss_fn))


def result_from_dict(saved: dict) -> FinetuneResult:
    """A ``FinetuneResult`` from ``result.json`` (fields an older version did not write take their defaults)."""
    from dataclasses import fields

    names = {f.name for f in fields(FinetuneResult)}
    defaults = {"zero_shot_avg_paper": saved.get("zero_shot_avg"),
                "zero_shot_langs_paper": saved.get("zero_shot_langs", [])}
    return FinetuneResult(**{**defaults, **{k: v for k, v in saved.items() if k in names}})


def read_result(out: Path | str) -> dict:
    path = Path(out) / RESULT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the job has not finished")
    return json.loads(path.read_text(encoding="utf-8"))
