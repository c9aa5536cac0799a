"""The XtremeDistil run: ``run(TaskDistillConfig) -> FinetuneResult``, on any number of ranks.

Every rank holds the frozen teacher (a task model of ``launch/finetune.py --save-model``) and a replica of the
student; each optimizer step's global batch is split over the ranks and the gradients are summed (every loss is
a sum over the rank's part divided by the global batch's count, so the step is the same on any number of
ranks). The transfer set is a corpus of ``python -m data_prep corpus`` written with the teacher's tokenizer,
read by the project's reader (``ds_kd.data.reader.ShardReader``: packed rows for per-token tasks, no masking) from
one global order, so its position is a few integers. The teacher's outputs are computed online, in the same
process, by default; ``--transfer-rows N`` computes them once for the first N rows' global batches and cycles over
them (:mod:`ds_kd.finetune.teacher_cache`: keyed by the teacher's digest and the data, reused across runs). The
English labels are read in an order that is a pure function of
(seed, step). English dev scores every ``eval_every`` steps of stages 2 and 3 (rank 0 scores, every rank
follows); a sub-stage stops after ``patience`` scores in a row below the best, and the best dev weights so far are
restored at the end of every sub-stage and before testing. Test files are read only then.

The run directory::

    <out>/checkpoint/last.pt   sub-stage, step in it, student and projections, optimizer, transfer position,
                               label step, best dev score and weights, patience, per-sub-stage records
    <out>/stages.json          one record per finished sub-stage (loss, trainable groups, steps, best dev score,
                               stopped early, seconds)
    <out>/model/               the student as a task model (``load_task_model``), with the tokenizer
    <out>/result.json          the fine-tuning job's result (every test language, parameters, ...)
    <out>/manifest.json        written last: settings, teacher, student config, stages, layer map, teacher cache
    <out>/teacher_cache/<key>/ the teacher-output cache of ``--transfer-rows`` (unless ``--teacher-cache``)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ds_kd.train import engine as dist
from ds_kd.train.loop import to_device
from ds_kd.errors import UsageError
from ds_kd.finetune import state as job_state
from ds_kd.finetune.data import IGNORE, collate
from ds_kd.finetune.distill import teacher_model_dir
from ds_kd.finetune.heads import TaskModel, load_task_model
from ds_kd.finetune.job import (FinetuneConfig, FinetuneResult, Job, load_test_data, load_train_dev, result_from_dict,
                                score_split, test_and_write)
from ds_kd.finetune.config import TaskDistillConfig
from ds_kd.finetune import teacher_cache as tcache
from ds_kd.finetune.teacher_cache import TeacherOutputs
from ds_kd.finetune.xtremedistil import (SubStage, attention_loss, build_projections,
                                        layer_map, logit_loss, pca_embeddings, representation_loss, schedule,
                                        set_trainable)
from ds_kd.manifest import (atomic_write_text, has_manifest, read_json_file, remove_outputs, rerun_action,
                            write_manifest)
from ds_kd.data.masking import MaskingConfig
from ds_kd.models.model import BertModel, count_parameters, make_config
from ds_kd.models.modeldir import load_tokenizer
from ds_kd.data.tasks import get_task

log = logging.getLogger("ds_kd")

HEARTBEAT_S = 30.0
"""While rank 0 builds the teacher cache it tells the waiting ranks at least this often (after an entry)."""
CHECKPOINT = job_state.CHECKPOINT
LAST = "last.pt"
STAGES_JSON = "stages.json"
SETTINGS_JSON = "settings.json"
OUTPUTS = ("result.json", "model", CHECKPOINT, STAGES_JSON, SETTINGS_JSON, "manifest.json")
NOT_SETTINGS = ("out", "resume", "overwrite", "num_workers", "save_every", "log_every", "threads", "name",
                "teacher_cache")


@dataclass
class Progress:
    """Where the run is: everything a checkpoint restores besides weights and optimizer."""

    sub_index: int = 0
    step: int = 0
    """Optimizer steps done in the current sub-stage."""
    label_step: int = 0
    """Optimizer steps of stage 3 done so far (the English order is a function of it)."""
    transfer_step: int = 0
    """Optimizer steps of stages 1 and 2 done so far (with ``--transfer-rows``, the cached batch is a function
    of it)."""
    cache_seconds: float = 0.0
    """Seconds this run spent building the teacher cache (0 when it found it complete)."""
    best_score: float = float("-inf")
    patience_used: int = 0
    last_score: float = float("nan")
    stage_loss: float = 0.0
    """Sum of the current sub-stage's step losses."""
    records: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """Every optimizer step's global loss, in order."""
    seconds: float = 0.0


def transfer_shards(transfer: str | Path) -> Path:
    """The shards directory of the ``--transfer`` corpus (``<corpus>/shards`` or the shards directory itself);
    UsageError naming the flag, the path and the command that builds one when it is missing or is not a corpus."""
    path = Path(transfer)
    build = ("the transfer set is a corpus written by `python -m data_prep corpus --raw RAW --out DIR --tokenizer "
             "TEACHER` (with the teacher's tokenizer)")
    if not path.is_dir():
        raise UsageError(f"--transfer {path}: no such directory; {build}")
    shards = path / "shards" if (path / "shards").is_dir() else path
    if not (shards / "manifest.json").is_file():
        raise UsageError(f"--transfer {path}: not a corpus (no shards manifest, {path / 'shards' / 'manifest.json'});"
                         f" {build}")
    return shards


def settings_of(cfg: TaskDistillConfig, teacher_dir: Path) -> dict:
    """What determines the run's result (compared on a re-run): the config but paths of the output and speed
    flags, the teacher's weights' digest, the transfer corpus's and the task data's manifests' digests."""
    def digest(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    transfer = Path(cfg.transfer)
    shards = transfer / "shards" if (transfer / "shards").is_dir() else transfer
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_SETTINGS}
    settings.update(stages=list(cfg.stages), teacher=str(teacher_dir.resolve()),
                    teacher_sha256=digest(teacher_dir / "task_model.safetensors"),
                    transfer=str(shards.resolve()), transfer_manifest_sha256=digest(shards / "manifest.json"),
                    data=str(Path(cfg.data).resolve()),
                    data_manifest_sha256=digest(Path(cfg.data) / cfg.task / "manifest.json"))
    return settings


def plan_out(cfg: TaskDistillConfig, settings: dict) -> str:
    """The re-run rule (``ds_kd.manifest.rerun_action``) on ``cfg.out``: start, skip, resume or overwrite."""
    out = Path(cfg.out)
    finished = has_manifest(out)
    recorded = (json.loads((out / "manifest.json").read_text(encoding="utf-8"))["settings"] if finished
                else read_json_file(out / SETTINGS_JSON))
    return rerun_action(out, "task distillation", recorded, settings, finished=finished,
                        unfinished=(out / CHECKPOINT / LAST).is_file(), overwrite=cfg.overwrite,
                        resume=cfg.resume, can_extend=False)


def build_student(cfg: TaskDistillConfig, teacher: TaskModel) -> TaskModel:
    """The student task model: ``cfg.student``'s shape on the teacher's vocabulary, the teacher's head kind and
    labels, word embeddings by ``cfg.embeddings`` (PCA of the teacher's, a copy, or random)."""
    t_cfg = teacher.encoder.config
    s_cfg = make_config(cfg.student, vocab_size=t_cfg.vocab_size, pad_token_id=t_cfg.pad_token_id,
                        max_position_embeddings=t_cfg.max_position_embeddings)
    student = TaskModel(BertModel(s_cfg), teacher.kind, teacher.labels, **teacher.head_args,
                        segment_ids_trained=teacher.segment_ids_trained)
    words = teacher.encoder.embeddings.word_embeddings.weight.detach()
    if cfg.embeddings == "copy" and s_cfg.hidden_size != t_cfg.hidden_size:
        raise UsageError(f"--embeddings copy needs the teacher's width {t_cfg.hidden_size}; the student "
                         f"{cfg.student} has {s_cfg.hidden_size}: use --embeddings pca")
    with torch.no_grad():
        if cfg.embeddings == "pca":
            student.encoder.embeddings.word_embeddings.weight.copy_(pca_embeddings(words, s_cfg.hidden_size))
        elif cfg.embeddings == "copy":
            student.encoder.embeddings.word_embeddings.weight.copy_(words)
    return student


class Runner:
    """The run's state on one rank: teacher, student, projections, data, progress; ``run()`` drives it."""

    def __init__(self, cfg: TaskDistillConfig, teacher_dir: Path, settings: dict):
        from ds_kd.data.reader import ReaderConfig, ShardReader
        from ds_kd.data.tokenizer_files import load_pretrained
        from ds_kd.train.training import resolve_data

        self.cfg, self.settings, self.out = cfg, settings, Path(cfg.out)
        self.spec = get_task(cfg.task, cfg.data)
        self.teacher, _ = load_task_model(teacher_dir)
        self.teacher.requires_grad_(False).eval().to(dist.device())
        corpus = resolve_data(transfer_shards(cfg.transfer), None)
        self.tokenizer = load_tokenizer(teacher_dir, "task distillation (--teacher)")
        if load_pretrained(corpus.tokenizer_dir).get_vocab() != self.tokenizer.get_vocab():
            raise UsageError(f"{teacher_dir}: the teacher's tokenizer is not the one {cfg.transfer}'s shards were "
                             f"written with: write the transfer corpus with `python -m data_prep corpus --tokenizer "
                             f"{teacher_dir}`")
        self.ft_cfg = FinetuneConfig(model=str(teacher_dir), task=cfg.task, data=cfg.data, out=cfg.out,
                                     seed=cfg.seed, name=cfg.name or self.out.resolve().name,
                                     batch_size=cfg.label_batch, max_len=cfg.max_len, save_model=True,
                                     device=str(dist.device()), threads=cfg.threads)
        self.data = load_train_dev(self.ft_cfg, self.spec, self.tokenizer)  # no test file is read here
        if self.data.labels.to_dict() != self.teacher.labels.to_dict():
            raise UsageError(f"{teacher_dir}: the teacher's label sets differ from those of {cfg.data}/{cfg.task}'s "
                             f"English training data: fine-tune the teacher on the same task data")
        torch.manual_seed(cfg.seed)  # every rank builds the same student
        self.student = build_student(cfg, self.teacher)
        s_cfg, t_cfg = self.student.encoder.config, self.teacher.encoder.config
        self.mapped = layer_map(t_cfg.num_hidden_layers, s_cfg.num_hidden_layers, cfg.layer_map)
        self.projections = build_projections(s_cfg.hidden_size, t_cfg.hidden_size, len(self.mapped),
                                             s_cfg.initializer_range)
        self.student.to(dist.device()), self.projections.to(dist.device())
        self.plan = schedule(s_cfg.num_hidden_layers, cfg.freeze_embeddings, cfg.stages)
        if not cfg.gradual_unfreezing:
            self.plan = [sub for sub in self.plan if sub.stage == "represent"] + [
                next(s for s in reversed(self.plan) if s.stage == stage) for stage in cfg.stages
                if stage != "represent"]
        world = dist.world_size()
        for name in ("transfer_batch", "label_batch"):
            if getattr(cfg, name) % world:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is not a multiple of the "
                                 f"{world} ranks")
        packing = self.spec.kind == "tagging"  # per-token logits: packed rows; per-example heads read [CLS]
        self.reader = ShardReader(ReaderConfig(
            shard_dir=str(corpus.shard_dir), split="train", micro_batch_size=cfg.transfer_batch // world,
            seed=cfg.transfer_order_seed, num_workers=cfg.num_workers, max_len=cfg.max_len, packing=packing,
            masking=MaskingConfig(mlm_probability=0.0)), dist.rank(), world)
        self.transfer_iter = None
        self.progress = Progress()
        self.best_state: dict | None = None
        self.cache_spec, self.cache_entries, self.cache_read_from = None, None, None
        if cfg.transfer_rows and any(sub.stage != "labels" for sub in self.plan):
            self.cache_spec = self.teacher_cache_spec(teacher_dir, settings, packing)
            self.cache_root = Path(cfg.teacher_cache) if cfg.teacher_cache else self.out / "teacher_cache"
            self.check_cache_memory()

    # -- the teacher-output cache (--transfer-rows) ----------------------------------------------------------
    def teacher_cache_spec(self, teacher_dir: Path, settings: dict, packing: bool) -> tcache.CacheSpec:
        cfg = self.cfg
        if "teacher_sha256" not in settings:
            settings = settings_of(cfg, teacher_dir)
        if settings["teacher_sha256"] is None or settings["transfer_manifest_sha256"] is None:
            raise UsageError(f"--transfer-rows {cfg.transfer_rows}: the teacher cache is keyed by the digests of "
                             f"{teacher_dir}/task_model.safetensors and of the transfer corpus's shards/manifest.json;"
                             f" one of them is missing")
        represent = "represent" in cfg.stages
        return tcache.CacheSpec(
            teacher_sha256=settings["teacher_sha256"], transfer_manifest_sha256=settings["transfer_manifest_sha256"],
            seed=cfg.transfer_order_seed, transfer_batch=cfg.transfer_batch, max_len=cfg.max_len, packing=packing,
            hidden=tuple(sorted(set(self.mapped))) if represent else (), attention=represent and cfg.attention,
            batches=tcache.num_batches(cfg.transfer_rows, cfg.transfer_batch))

    def check_cache_memory(self) -> None:
        """Log the cache's size; refuse (UsageError naming --transfer-rows, on every rank) one over the limit."""
        spec, t_cfg = self.cache_spec, self.teacher.encoder.config
        labels = self.teacher.labels
        per_row = tcache.bytes_per_row(spec, num_labels=len(labels.tags if self.spec.kind == "tagging"
                                                             else labels.classes),
                                       per_token=self.spec.kind == "tagging", hidden_size=t_cfg.hidden_size,
                                       num_heads=t_cfg.num_attention_heads)
        world = dist.world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        refusal = tcache.memory_refusal(spec, per_row, self.cfg.transfer_rows, world, local,
                                        tcache.available_memory())
        if float(dist.all_reduce(torch.tensor(float(refusal is not None), device=dist.device()), "max")):
            raise UsageError(refusal or f"--transfer-rows {self.cfg.transfer_rows}: the teacher-output cache does not "
                                        f"fit in the memory of another rank's machine (see its message)")
        row = sum(per_row.values())
        budgets = {"represent": self.cfg.represent_steps, "logits": self.cfg.logits_steps, "labels": 0}
        most = sum(budgets[sub.stage] for sub in self.plan)
        log.info("[task-distill] teacher cache: %d rows in %d global batches of %d, about %.1f MiB (%.1f KiB per row;"
                 " each rank keeps its share), for at most %d transfer steps", spec.batches * spec.transfer_batch,
                 spec.batches, spec.transfer_batch, row * spec.batches * spec.transfer_batch / 2**20, row / 1024,
                 most)
        if spec.batches > most:
            log.warning("[task-distill] --transfer-rows %d: %d global batches cached, more than the %d transfer steps "
                        "of the run: the last ones are never read", self.cfg.transfer_rows, spec.batches, most)

    def prepare_cache(self) -> None:
        """Rank 0 finds a complete cache that serves this run or builds the missing entries of this run's key
        (a world-size-1 reader whose micro batch is the global batch); the others wait (rank 0 reports after
        each entry at least every ``HEARTBEAT_S``, so no collective waits past its timeout); then every rank
        loads its rows of every global batch."""
        spec, started = self.cache_spec, time.time()
        folder = None
        if dist.is_main():
            folder = tcache.find_complete(self.cache_root, spec)
            if folder is not None:
                log.info("[task-distill] teacher cache %s: complete, reused (the teacher does not run)", folder)
            else:
                folder = self.cache_root / spec.key
                last = time.time()
                chunk = self.cfg.transfer_batch // dist.world_size()  # the online micro batch
                for _ in tcache.build(folder, spec, self.teacher, self.cache_reader(), dist.device(), chunk):
                    if time.time() - last > HEARTBEAT_S:
                        dist.broadcast_object(None)
                        last = time.time()
                self.progress.cache_seconds += time.time() - started
            dist.broadcast_object(str(folder))
        else:
            while (folder := dist.broadcast_object(None)) is None:
                pass
        self.progress.cache_seconds = dist.broadcast_object(self.progress.cache_seconds)
        self.cache_read_from = Path(folder)
        self.cache_entries = tcache.load(self.cache_read_from, spec, dist.rank(), dist.world_size())
        log.info("[task-distill] teacher cache %s: %d global batches loaded, %.1f MiB on this rank",
                 self.cache_read_from, spec.batches, tcache.cache_bytes(self.cache_entries) / 2**20)

    def cache_reader(self):
        """The transfer order from its start on one rank reading whole global batches."""
        from ds_kd.data.reader import ShardReader

        cfg = self.reader.cfg
        return ShardReader(replace(cfg, micro_batch_size=self.cfg.transfer_batch), 0, 1)

    def cache_record(self) -> dict | None:
        """What the manifest records of the cache: rows, batches, key, where read, build seconds, passes."""
        spec = self.cache_spec
        if spec is None:
            return None
        steps = {}
        for record in self.progress.records:
            if record["stage"] != "labels":
                steps[record["stage"]] = steps.get(record["stage"], 0) + record["steps"]
        return {"transfer_rows": self.cfg.transfer_rows, "batches": spec.batches, "key": spec.key,
                "read_from": str(self.cache_read_from) if self.cache_read_from else None,
                "build_seconds": round(self.progress.cache_seconds, 3),
                "hidden_states": list(spec.hidden), "attention": spec.attention,
                "epochs": {stage: tcache.pass_count(n, spec.batches) for stage, n in steps.items()}}

    # -- one step ------------------------------------------------------------------------------------------
    def trainable(self, sub: SubStage) -> list[torch.nn.Parameter]:
        params = set_trainable(self.student, sub.groups)
        if sub.stage == "represent":
            params += list(self.projections.parameters())
        return params

    def teacher_batch(self, represent: bool, want_scores: bool) -> tuple[dict, TeacherOutputs]:
        """The student's inputs of this rank's part of the next transfer step and the teacher's outputs on them:
        the next batch of the reader through the teacher (online), or the cached global batch of the step."""
        if self.cache_entries is not None:
            index = tcache.batch_index(self.progress.transfer_step, self.cache_spec.batches, self.cfg.seed)
            entry = self.cache_entries[index]
            inputs = to_device(entry["inputs"], dist.device())
            return ({k: inputs.get(k) for k in tcache.INPUTS}, TeacherOutputs.of_entry(entry, dist.device()))
        if self.transfer_iter is None:
            self.transfer_iter = iter(self.reader)
        batch = to_device(next(self.transfer_iter), dist.device())
        inputs = {k: batch.get(k) for k in tcache.INPUTS}
        with torch.no_grad():
            ref = self.teacher(**inputs, output_hidden_states=represent, output_attention_scores=want_scores)
        return inputs, TeacherOutputs(ref.logits, ref.encoder.hidden_states, ref.encoder.attention_scores)

    def transfer_loss(self, sub: SubStage) -> torch.Tensor:
        represent = sub.stage == "represent"
        want_scores = represent and self.cfg.attention
        inputs, ref = self.teacher_batch(represent, want_scores)
        real_BT = inputs["attention_mask"].bool()
        out = self.student(**inputs, output_hidden_states=represent, output_attention_scores=want_scores)
        if represent:
            tokens = global_count(real_BT.sum())
            loss = representation_loss(out.encoder.hidden_states, ref.hidden_states, real_BT, self.mapped,
                                       self.projections, tokens)
            if want_scores:
                keep = inputs["sequence_ids"] if inputs["sequence_ids"] is not None else inputs["attention_mask"]
                pairs = global_count(sum(int(n) ** 2 for n in sentence_lengths(keep)))
                loss = loss + attention_loss(out.encoder.attention_scores, ref.attention_scores, keep,
                                             self.mapped, pairs)
            return loss
        key = next(iter(out.logits))
        real = real_BT if out.logits[key].dim() == 3 else torch.ones_like(real_BT[:, 0])
        return logit_loss(out.logits[key], ref.logits[key], real, self.cfg.temperature, global_count(real.sum()))

    def labels_loss(self) -> torch.Tensor:
        indices = label_batch_indices(len(self.data.train), self.cfg.label_batch, self.cfg.seed,
                                      self.progress.label_step, dist.rank(), dist.world_size())
        batch = to_device(collate([self.data.train[i] for i in indices], self.spec.kind), dist.device())
        out = self.student(**batch)
        targets = {"classes": batch.get("labels"), "tags": batch.get("labels"), "intents": batch.get("intent_labels")}
        total, count = 0.0, 0
        for key, logits in out.logits.items():
            target = targets[key]
            total = total + F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
            count += int(target.ne(IGNORE).sum())
        return total / max(1.0, global_count(count))

    def step(self, sub: SubStage, params: list, optimizer: torch.optim.Optimizer) -> float:
        step_number = len(self.progress.losses)
        torch.manual_seed(self.cfg.seed * 1_000_003 + step_number * 101 + dist.rank())  # dropout, per step
        self.student.train()
        loss = self.labels_loss() if sub.stage == "labels" else self.transfer_loss(sub)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if sub.stage == "labels":
            self.progress.label_step += 1
        else:
            self.progress.transfer_step += 1
        return float(dist.all_reduce(loss.detach().clone()))

    # -- dev, best weights, checkpoints --------------------------------------------------------------------
    def dev_score(self) -> float:
        score = None
        if dist.is_main():
            job = self.job()
            score = score_split(job, *self.data.dev, desc="dev en")[self.spec.metric]
        return dist.broadcast_object(score)

    def job(self) -> Job:
        return Job(self.ft_cfg, self.spec, dist.device(), self.tokenizer, self.data, self.student,
                   torch.Generator(), time.time() - self.progress.seconds, self.settings)

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def save(self, optimizer) -> None:
        if dist.is_main():
            ckpt = self.out / CHECKPOINT
            ckpt.mkdir(parents=True, exist_ok=True)
            saved = {"progress": asdict(self.progress), "student": self.student.state_dict(),
                     "projections": self.projections.state_dict(), "optimizer": optimizer and optimizer.state_dict(),
                     "reader": self.reader.state_dict(), "best_state": self.best_state}
            torch.save(saved, ckpt / (LAST + ".tmp"))
            (ckpt / (LAST + ".tmp")).replace(ckpt / LAST)
        dist.barrier()

    def load(self) -> dict | None:
        path = self.out / CHECKPOINT / LAST
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=False)
        self.progress = Progress(**saved["progress"])
        self.student.load_state_dict(saved["student"])
        self.projections.load_state_dict(saved["projections"])
        self.reader.load_state_dict(saved["reader"])
        self.best_state = saved["best_state"]
        log.info("resumed %s at sub-stage %d (%s), step %d", self.out, self.progress.sub_index,
                 self.plan[self.progress.sub_index].name, self.progress.step)
        return saved

    # -- the schedule --------------------------------------------------------------------------------------
    def run_sub_stage(self, sub: SubStage, budget: int, saved: dict | None) -> dict:
        """Train ``sub`` for ``budget`` steps (fewer when dev stops improving); returns its record."""
        p, started = self.progress, time.time()
        params = self.trainable(sub)
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.01)
        if saved is not None and saved["optimizer"] is not None:  # saved mid-way through this sub-stage
            optimizer.load_state_dict(saved["optimizer"])
        scored = sub.stage != "represent"
        stopped = False
        while p.step < budget and not stopped:
            loss = self.step(sub, params, optimizer)
            p.step += 1
            p.losses.append(loss)
            p.stage_loss += loss
            if p.step % self.cfg.log_every == 0:
                recent = p.losses[-self.cfg.log_every:]
                log.info("[task-distill] %s step %d/%d: loss %.4f", sub.name, p.step, budget, sum(recent) / len(recent))
            if scored and (p.step % self.cfg.eval_every == 0 or p.step == budget):
                stopped = self.score_and_keep()
                log.info("[task-distill] %s step %d: dev %s %.4f (best %.4f)%s", sub.name, p.step, self.spec.metric,
                         p.last_score, p.best_score, ", stopping early" if stopped else "")
            if p.step % self.cfg.save_every == 0 and p.step < budget and not stopped:
                self.save(optimizer)
        if scored and self.best_state is not None:
            self.student.load_state_dict(self.best_state)  # continue from the best dev weights so far
        record = {"sub_stage": sub.name, "stage": sub.stage, "trainable": list(sub.groups), "steps": p.step,
                  "mean_loss": p.stage_loss / max(1, p.step), "best_dev": p.best_score if scored else None,
                  "stopped_early": stopped, "seconds": round(time.time() - started, 3)}
        if self.cache_spec is not None and sub.stage != "labels":
            record["cache_epochs"] = tcache.pass_count(p.step, self.cache_spec.batches)
        log.info("[task-distill] %s: %s", sub.name, record)
        p.records.append(record)
        p.sub_index, p.step, p.stage_loss, p.patience_used = p.sub_index + 1, 0, 0.0, 0
        self.save(None)  # the next sub-stage starts with a fresh optimizer
        if dist.is_main():
            atomic_write_text(self.out / STAGES_JSON, json.dumps(p.records, indent=2) + "\n")
        return record

    def score_and_keep(self) -> bool:
        """Score dev; keep the weights when at least as good as the best so far; True when ``patience`` scores
        passed below the best."""
        p = self.progress
        score = p.last_score = self.dev_score()
        if score >= p.best_score:  # a tie keeps the newer weights, as the official code does
            p.best_score, p.patience_used, self.best_state = score, 0, self.snapshot()
        else:
            p.patience_used += 1
        return p.patience_used >= self.cfg.patience

    def run(self, resume: bool) -> FinetuneResult | None:
        saved = self.load() if resume else None
        budgets = {"represent": self.cfg.represent_steps, "logits": self.cfg.logits_steps,
                   "labels": self.cfg.labels_steps}
        t0 = time.time() - self.progress.seconds  # the run's seconds include building the teacher cache
        if self.cache_spec is not None and any(sub.stage != "labels" for sub in self.plan[self.progress.sub_index:]):
            self.prepare_cache()
        for index in range(self.progress.sub_index, len(self.plan)):
            sub = self.plan[index]
            self.progress.seconds = time.time() - t0
            self.run_sub_stage(sub, budgets[sub.stage], saved if saved and index == saved["progress"]["sub_index"]
                               else None)
        if self.best_state is not None:
            self.student.load_state_dict(self.best_state)
        if not dist.is_main():
            return None
        return self.finish()

    def finish(self) -> FinetuneResult:
        """Rank 0: read the test files now, test every language, write model/, result.json and manifest.json."""
        tests, rates = load_test_data(self.ft_cfg, self.spec, self.tokenizer, self.data.labels)
        data = replace(self.data, tests=tests, unknown_token_rates={**self.data.unknown_token_rates, **rates})
        job = replace(self.job(), data=data)
        best = max((r["best_dev"] for r in self.progress.records if r["best_dev"] is not None), default=float("nan"))
        result = test_and_write(job, len(self.progress.records), best, self.progress.records)
        s_cfg = self.student.encoder.config
        write_manifest(self.out, "task_distill", settings=self.settings, recipe=self.cfg.recipe,
                       teacher=self.settings["teacher"], student_config=asdict(s_cfg), layer_map=self.mapped,
                       stages=self.progress.records, losses=self.progress.losses, export="model",
                       num_params=result.num_params,
                       num_params_encoder_non_embedding=count_parameters(self.student.encoder, False),
                       teacher_num_params_encoder_non_embedding=count_parameters(self.teacher.encoder, False),
                       en=result.en, zero_shot_avg_paper=result.zero_shot_avg_paper, seconds=result.seconds,
                       teacher_cache=self.cache_record())
        return result


def global_count(count) -> float:
    """The whole global batch's count (summed over ranks) of a per-rank ``count``."""
    return float(dist.all_reduce(torch.tensor(float(count), dtype=torch.float64, device=dist.device())))


def sentence_lengths(keep_BT: torch.Tensor) -> list[int]:
    """Tokens per sentence of a batch: ``keep_BT`` is a 0/1 mask (one sentence per row) or sequence ids."""
    if keep_BT.max() <= 1:
        return keep_BT.sum(dim=1).tolist()
    return [int(n) for row in keep_BT for n in torch.bincount(row)[1:] if n > 0]


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks, in one flat all-reduce (a missing gradient counts 0)."""
    if dist.world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce(torch.cat([g.flatten() for g in grads]))
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def label_batch_indices(num_examples: int, batch: int, seed: int, step: int, rank: int, world: int) -> list[int]:
    """The English examples of rank ``rank``'s part of stage-3 step ``step``: a seeded permutation per epoch,
    cut into global batches of ``batch`` (the last, short one dropped), each split into ``world`` equal parts."""
    per_epoch = max(1, num_examples // batch)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    chunk = order[index * batch: (index + 1) * batch]
    share = len(chunk) // world
    return chunk[rank * share: (rank + 1) * share]


def run(cfg: TaskDistillConfig) -> FinetuneResult:
    """Distil ``cfg.teacher`` into a fresh ``cfg.student`` by XtremeDistil's stages; see the module docstring.
    Every rank calls it; rank 0 returns the result (others return the one written). Refusals (UsageError,
    FileExistsError) come before any work."""
    teacher_dir = teacher_model_dir(cfg.teacher)
    transfer_shards(cfg.transfer)
    settings = settings_of(cfg, teacher_dir)
    action = plan_out(cfg, settings)
    out = Path(cfg.out)
    if action == "skip":
        log.info("%s/manifest.json: finished with the same settings: skipped (--overwrite runs it again)", out)
        return result_from_dict(json.loads((out / "result.json").read_text(encoding="utf-8")))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process needs no group (and no DeepSpeed op build)
        dist.init_distributed()
    runner = Runner(cfg, teacher_dir, settings)
    if dist.is_main():
        if action == "overwrite":
            remove_outputs(out, OUTPUTS)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SETTINGS_JSON, json.dumps(settings, indent=2, default=str) + "\n")
    dist.barrier()
    log.info("[task-distill] %s -> %s: layer map %s, %d sub-stages: %s", teacher_dir, cfg.student, runner.mapped,
             len(runner.plan), ", ".join(s.name for s in runner.plan))
    result = runner.run(resume=action == "resume")
    dist.barrier()
    return result or result_from_dict(json.loads((out / "result.json").read_text(encoding="utf-8")))
