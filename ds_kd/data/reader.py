"""Streaming reader of the block shards: masked, padded MLM batches of one global order, split at read time.

**The order.** A split's sentences are numbered by their place in the shards (the sentence id). The training
stream is the endless concatenation of epochs; position ``q`` of it is position ``q mod N`` of epoch ``q div N``
(N sentences). Within an epoch the blocks are permuted (seeded by (seed, epoch)), cut into windows of
``shuffle_window`` blocks, and the sentences of each window are permuted (seeded by (seed, epoch, window)).
So the sentence at any position is a pure function of (seed, epoch, position): :class:`ds_kd.data.order.SentenceOrder`.
Validation reads the split once, in shard order.

**The split.** Micro-step ``j`` of the whole job covers the ``world_size x micro_batch_size`` positions from
``j x world_size x micro_batch_size``; rank ``r`` takes the ``r``-th slice of ``micro_batch_size`` of them.
With ``A`` accumulation steps, optimizer step ``k`` (from 0) is micro-steps ``kA .. kA+A-1``: the global batch
``k`` is positions ``[kG, (k+1)G)`` with ``G = micro_batch_size x A x world_size``, whatever the ranks and
workers. DataLoader worker ``w`` of a rank prepares micro-steps ``start + w, start + w + num_workers, ...``,
which the DataLoader's round robin hands out in order. The order therefore does not depend on the number of
ranks, nodes or workers, and the reader's state is one number, the sentences consumed by the whole job
(plus the seed and a fingerprint of the corpus and settings to check against): resuming with another
topology is exact as long as the global batch stays the same (see :meth:`ShardReader.load_state_dict`).

**Seeking** reads nothing skipped: the window of a position follows from the block counts in the manifest,
and only that window's blocks are read. A worker reads the blocks of the windows it passes through (every
worker reads every block of the epoch, and keeps the sentences of its micro-steps).

Masks are drawn per sentence from (seed, epoch, sentence id) in the workers (see :mod:`ds_kd.data.masking`); on
the val split they do not change with the epoch. Every batch also carries ``sentence_ids`` ``[B]`` and a
``dropout_seed`` derived from (seed, first position of the batch): the training loop seeds dropout with it,
so dropout, too, does not depend on the topology.

**Batching** is the last stage and replaceable: ``collate`` (see :class:`ShardReader`) gets the masked sentences
of one rank's micro-step and makes the batch (padding by default; a packer can fill rows instead). The state
counts sentences, so any ``collate`` that keeps no sentence across micro-steps resumes exactly.

Debug: with ``DS_KD_SENTENCE_LOG=<dir>`` in the environment, every rank appends one line
``<stream position>\\t<sentence id>`` per sentence it hands out to ``<dir>/<split>-rank<R>.tsv``; the
optimizer step (from 1) of a training position is ``position // global_batch + 1``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ds_kd.errors import UsageError
from ds_kd.data.masking import Masker, MaskingConfig
from ds_kd.data.order import Sentence, StreamPlan
from ds_kd.schema import SPLITS
from ds_kd.data.shards import BlockTable, lang_codes, read_shards_manifest, special_ids, unmasked_ids

STATE_VERSION = 2
SENTENCE_LOG_ENV = "DS_KD_SENTENCE_LOG"


@dataclass
class ReaderConfig:
    """What to read and how to batch it."""

    shard_dir: str
    """The corpus's ``shards`` directory (holding ``manifest.json``, ``train/`` and ``val/``)."""
    split: str = "train"
    """``train`` or ``val``."""
    micro_batch_size: int = 32
    """Sentences per batch on one rank (the DeepSpeed micro batch)."""
    seed: int = 0
    """Seeds the block order, the shuffle, the masks and the dropout seeds."""
    shuffle_window: int = 8
    """Blocks whose sentences are shuffled together (a window of ``shuffle_window x block_size`` sentences)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the calling process."""
    epochs: int | None = None
    """Passes over the split; None: endless for train, one pass for val."""
    max_len: int = 512
    """Longer sentences are cut to this many tokens, keeping the final [SEP]."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """MLM masking proportions."""
    shuffle: bool | None = None
    """Permute blocks and sentences; None: on for train, off for val."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = False
    """Pin batch memory (faster copies to a GPU)."""
    packing: bool = False
    """Pack whole sentences into rows of ``max_len`` tokens (block-diagonal attention; see
    :mod:`ds_kd.data.packed_stream`); ``micro_batch_size`` then counts rows, not sentences."""
    lang_run: int | None = None
    """Equal sentences per language in every epoch, in monolingual runs of this many sentences (give the global
    batch: every optimizer step then reads one language; :mod:`ds_kd.data.lang_mix`, BiStil); None: the corpus's
    own mix. Not with ``packing``."""


class ShardStream(IterableDataset):
    """What each DataLoader worker runs: yields (micro-step, batch) for micro-steps ``start + worker + k x workers``."""

    def __init__(self, plan: StreamPlan, start: int):
        self.plan, self.start = plan, start

    def __iter__(self):
        info = get_worker_info()
        step, stride = (self.start + info.id, info.num_workers) if info else (self.start, 1)
        while (batch := self.plan.batch(step)) is not None:
            yield step, batch
            step += stride


class ShardReader:
    """Iterable of MLM batches for one global rank; resumable on any topology with :meth:`state_dict`.

    Each batch is a dict of ``input_ids``, ``attention_mask``, ``labels`` (``-100`` where not predicted), all
    ``[B, T]`` long tensors with T the longest sentence of the batch, ``lang_ids`` ``[B]`` (indices into
    :attr:`lang_codes`, the manifest's ``lang_codes``), ``sentence_ids`` ``[B]`` and ``dropout_seed`` (an int). Iterating again
    continues where the last iteration stopped. ``collate`` replaces the padding (e.g. by packing): it gets
    the masked sentences [(sentence id, input ids, language id)] and their labels and returns the batch;
    ``prepare`` then runs on every batch in the worker (see :attr:`StreamPlan.prepare`).
    """

    def __init__(self, cfg: ReaderConfig, rank: int = 0, world_size: int = 1,
                 collate: Callable[[list[Sentence], list[np.ndarray]], dict] | None = None,
                 prepare: Callable[[dict], dict] | None = None):
        check_config(cfg, rank, world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = read_shards_manifest(cfg.shard_dir)
        special = special_ids(self.manifest, cfg.shard_dir)
        self.lang_codes = lang_codes(self.manifest, cfg.shard_dir)  # a batch's lang_ids index these
        table = BlockTable.open(cfg.shard_dir, cfg.split, self.manifest)
        self.vocab_size = table.vocab_size
        shuffle = cfg.split == "train" if cfg.shuffle is None else cfg.shuffle
        epochs = cfg.epochs if cfg.epochs is not None or cfg.split == "train" else 1
        masker = Masker(cfg.masking, self.vocab_size, unmasked_ids(self.manifest, cfg.shard_dir), special["mask"])
        plan_class = StreamPlan
        if cfg.packing:
            from ds_kd.data.packed_stream import PackedStreamPlan

            plan_class = PackedStreamPlan
        self._plan = plan_class(table, rank, world_size, cfg.micro_batch_size, cfg.seed, shuffle, cfg.shuffle_window,
                                epochs, cfg.split != "train", cfg.max_len, special, masker, collate, prepare,
                                lang_run=cfg.lang_run, lang_codes=self.lang_codes)
        self._steps = 0  # micro-steps of the whole job handed out
        self._log = sentence_log(cfg.split, rank)

    @property
    def plan(self) -> StreamPlan:
        """What this rank's workers run: the order, the slicing, the masks (read-only use)."""
        return self._plan

    @property
    def num_samples(self) -> int:
        """Sentences of this split (all ranks together)."""
        return self._plan.order.num_sentences

    @property
    def sentences_consumed(self) -> int:
        """Sentences of the stream handed out by every rank together (assuming ranks step together); unpacked
        streams only (a packed stream counts rows, see :meth:`state_dict`)."""
        return int(min(self._steps * self._plan.step_size, self._plan.stream_length))

    @property
    def epoch(self) -> int:
        if self.cfg.packing:
            return self._plan.locator.epoch
        return self.sentences_consumed // self.num_samples

    def sentences_per_lang(self, consumed: int) -> dict[str, int]:
        """Sentences of each language (by code) among the first ``consumed`` of a balanced stream
        (``lang_run``); empty for the corpus's own mix, whose counts the order does not fix."""
        return self._plan.order.counts(consumed) if self.cfg.lang_run else {}

    def steps_per_epoch(self, global_batch: int) -> float:
        """Optimizer steps of ``global_batch`` sentences (unpacked) or rows (packed) in one epoch; packed, the
        rows per sentence of the first window stand for the epoch's."""
        per_epoch = self.num_samples * (self._plan.rows_per_sentence() if self.cfg.packing else 1.0)
        return per_epoch / global_batch

    def __iter__(self) -> Iterator[dict]:
        num_workers = self.cfg.num_workers
        # Workers seed nothing from the global RNG; a private generator keeps DataLoader from drawing its base
        # seed from it, which would shift dropout after a resume.
        loader = DataLoader(ShardStream(self._plan, self._steps), batch_size=None, num_workers=num_workers,
                            pin_memory=self.cfg.pin_memory, generator=torch.Generator(),
                            prefetch_factor=self.cfg.prefetch_factor if num_workers else None)
        batches = iter(loader)
        try:
            for step, batch in batches:
                if step != self._steps:  # the round robin is the order: anything else is a bug, not data
                    raise RuntimeError(f"micro-step {step} arrived where {self._steps} was due")
                self._steps += 1
                if "window" in batch:  # packed: where the stream is, for a resume
                    self._plan.locator = type(self._plan.locator)(*batch.pop("window").tolist())
                if self._log is not None:
                    self._record(step, batch)
                batch.pop("stream_positions", None)
                yield batch
        finally:
            # Stop the workers now, also after an error or an early break. Left to the garbage collector
            # (a worker's error keeps the iterator referenced from its traceback), the DataLoader waits
            # seconds for each worker before terminating it.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _record(self, step: int, batch: dict) -> None:
        """Unpacked: (stream position, sentence id) lines. Packed: (row of the stream, sentence id) lines."""
        if "stream_positions" in batch:
            rows = [step * self._plan.step_size + self.rank * self.cfg.micro_batch_size + r
                    for r, n in enumerate(batch["sequence_ids"].max(dim=1).values.tolist()) for _ in range(n)]
            with open(self._log, "a", encoding="utf-8") as f:
                f.writelines(f"{r}\t{s}\n" for r, s in zip(rows, batch["sentence_ids"].tolist()))
            return
        positions = self._plan.positions(step)
        with open(self._log, "a", encoding="utf-8") as f:
            f.writelines(f"{p}\t{s}\n" for p, s in zip(positions.tolist(), batch["sentence_ids"].tolist()))

    def fingerprint(self) -> dict:
        """What the stream's order and content depend on besides the seed: the corpus and the settings."""
        corpus = hashlib.sha256(json.dumps(
            [[s["file"], s["num_bytes"], s["sha256"]] for s in self.manifest["splits"][self.cfg.split]["shards"]]
        ).encode()).hexdigest()[:16]
        p = self._plan
        return {"corpus": corpus, "shuffle": p.shuffle, "shuffle_window": p.shuffle_window, "max_len": p.max_len,
                "masking": list(asdict(self.cfg.masking).values()), "packing": self.cfg.packing,
                "lang_run": self.cfg.lang_run}

    def state_dict(self) -> dict:
        """The position in the stream (JSON-serialisable, a few hundred bytes, the same on every rank and for every
        topology): sentences consumed by the whole job, with the seed and the fingerprint to check against."""
        if self.cfg.packing:
            return {"version": STATE_VERSION, "split": self.cfg.split, "seed": self.cfg.seed, "epoch": self.epoch,
                    "rows_consumed": self._steps * self._plan.step_size, "window": self._plan.locator.as_list(),
                    **self.fingerprint()}
        return {"version": STATE_VERSION, "split": self.cfg.split, "seed": self.cfg.seed, "epoch": self.epoch,
                "sentences_consumed": self.sentences_consumed, **self.fingerprint(),
                **({"sentences_per_lang": self.sentences_per_lang(self.sentences_consumed)} if self.cfg.lang_run
                   else {})}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["sentences_consumed"]`` sentences.

        The seed, corpus and settings must match; the position must fall on a micro-step of this topology,
        which holds whenever the global batch is the one of the run that saved it. Raises ValueError saying
        what differs."""
        if state.get("version") != STATE_VERSION:
            raise UsageError(f"reader state of version {state.get('version')}, this reader reads {STATE_VERSION}: "
                             f"the checkpoint was written by an older version of the code")
        mine = {"split": self.cfg.split, "seed": self.cfg.seed, **self.fingerprint()}
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise UsageError(f"cannot resume the {self.cfg.split} stream of {self.cfg.shard_dir} exactly: {detail}")
        unit = "rows" if self.cfg.packing else "sentences"
        consumed = int(state[f"{unit}_consumed"])
        steps, rest = divmod(consumed, self._plan.step_size)
        if rest:
            raise UsageError(f"the saved position, {consumed} {unit}, is not a whole number of micro-steps of "
                             f"{self.world_size} ranks x {self.cfg.micro_batch_size} {unit}: keep the global "
                             f"batch (micro batch x accumulation x ranks) of the run that saved it")
        self._steps = steps
        if self.cfg.packing:
            self._plan.locator = type(self._plan.locator)(*state["window"])


def sentence_log(split: str, rank: int) -> Path | None:
    """Where this rank logs the sentences it hands out (``$DS_KD_SENTENCE_LOG``), or None."""
    directory = os.environ.get(SENTENCE_LOG_ENV)
    if not directory:
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    return Path(directory) / f"{split}-rank{rank}.tsv"


def check_config(cfg: ReaderConfig, rank: int, world_size: int) -> None:
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    for name in ("micro_batch_size", "shuffle_window"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.max_len < 2:
        raise ValueError(f"max_len must be at least 2 ([CLS] and [SEP]), got {cfg.max_len}")
    if cfg.lang_run is not None and (cfg.lang_run < 1 or cfg.packing):
        raise UsageError(f"--lang-mix balanced needs one sentence per row (--packing off) and a positive run, got "
                         f"run {cfg.lang_run}, packing {cfg.packing}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"epochs must be at least 1 or None (endless), got {cfg.epochs}")
