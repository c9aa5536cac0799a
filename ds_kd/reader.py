"""Streaming reader of the corpus shards: masked, padded MLM batches, split across ranks and workers.

The stream of one split is cut into ``world_size x num_workers`` disjoint sub-streams, one per DataLoader
worker of each rank (global rank, counting every node). With at least that many shards, each sub-stream
reads whole shards (the shard order is permuted per epoch, identically on every rank); with fewer, every
sub-stream reads all shards and keeps every G-th sample, so small corpora still feed every worker.

Shuffling is a block shuffle: each worker fills a buffer of ``shuffle_buffer`` samples, permutes it with a
generator seeded by (seed, epoch, sub-stream, block) and empties it. Unlike a sliding reservoir, the state of
the stream at any point is then a function of a single number, the batches it has produced, so resuming
skips whole epochs, whole shards and whole blocks without reading them, and decodes at most one block.

Masks are drawn per sample from (seed, epoch, sample id) in the workers (see :mod:`ds_kd.masking`); on the
val split they do not change with the epoch, so perplexities of different evaluations are comparable.

The DataLoader takes batches from its workers round robin; the reader counts the batches it hands out, and
:meth:`ShardReader.state_dict` is that count plus the settings that shape the stream. A reader that loads it
restarts each worker where it stopped and starts the round robin at the worker that was due next.
"""
from __future__ import annotations

import io
import math
import re
import tarfile
import warnings
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ds_kd.manifest import MANIFEST, read_manifest
from ds_kd.masking import Masker, MaskingConfig, pad_batch
from ds_kd.schema import (LANG_TO_ID, REQUIRED_ROLES, SAMPLE_IDS, SAMPLE_LANG, SHARD_PATTERN, SPLITS, bpe_special_ids,
                          role_of)

STATE_VERSION = 1
# Separate random streams for the three uses of the seed.
_SHARD_ORDER, _BLOCK_ORDER, _MASKS = 1, 2, 3


class ShardError(RuntimeError):
    """A shard file is missing, corrupt, truncated or disagrees with the manifest. The message names it."""


@dataclass
class ReaderConfig:
    """What to read and how to batch it."""

    shard_dir: str
    """The corpus's ``shards`` directory (holding ``manifest.json``, ``train/`` and ``val/``)."""
    split: str = "train"
    """``train`` or ``val``."""
    micro_batch_size: int = 32
    """Sequences per batch on one rank (the DeepSpeed micro batch)."""
    seed: int = 0
    """Seeds the shard order, the shuffle and the masks."""
    shuffle_buffer: int = 10000
    """Samples per shuffle block in each worker."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the calling process."""
    epochs: int | None = None
    """Passes over the split; None: endless for train, one pass for val."""
    max_len: int = 512
    """Longer sequences are cut to this many tokens, keeping the final [SEP]."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """MLM masking proportions."""
    shuffle: bool | None = None
    """Permute shards and samples; None: on for train, off for val."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = False
    """Pin batch memory (faster copies to a GPU)."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file of a split."""

    path: str
    num_samples: int
    first_uid: int
    """Index of its first sample within the split, in manifest order: the sample's id for masking."""


@dataclass(frozen=True)
class Segment:
    """Samples ``start, start + step, ...`` (``count`` of them) of one shard."""

    shard: ShardInfo
    start: int
    step: int
    count: int

    def skip(self, num: int) -> "Segment":
        return Segment(self.shard, self.start + num * self.step, self.step, self.count - num)


def read_shards_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shards directory; raises :class:`ds_kd.manifest.MissingStageError` naming it."""
    return read_manifest(shard_dir, needed_by="the shard reader (ds_kd.reader); write the shards with "
                                               "`python -m data_prep corpus`")


def check_vocab(shard_dir: str | Path, vocab_size: int, what: str = "model") -> None:
    """Raise ValueError naming the manifest when ``vocab_size`` differs from the one the shards hold."""
    manifest = read_shards_manifest(shard_dir)
    path = Path(shard_dir) / MANIFEST
    if "vocab_size" not in manifest:
        raise ValueError(f"{path}: no vocab_size recorded, cannot check the {what}'s vocabulary against it")
    if int(manifest["vocab_size"]) != int(vocab_size):
        raise ValueError(f"the {what} has a vocabulary of {vocab_size} tokens but the shards were written "
                         f"with {manifest['vocab_size']} (see {path}); use the corpus's own tokenizer or "
                         f"rewrite the shards")


def special_ids(manifest: dict, shard_dir: str | Path | None = None) -> dict[str, int]:
    """Special token ids by role (pad, unk, cls, sep, mask; bos, eos where the tokenizer has them).

    The shards manifest records them by role (``"pad": 1``), or, written by an older version, by BERT token
    (``"[PAD]": 0``). They are the tokenizer's own: a brought tokenizer numbers them its own way (XLM-R: pad 1),
    so no ids are assumed for a manifest that records none, except for the project's own BPE (ids 0..4, known
    from ``<corpus>/tokenizer/manifest.json``). Raises ValueError naming the manifest and the command that
    records them when pad, cls, sep or mask is missing.
    """
    given = manifest.get("special_token_ids") or manifest.get("special_ids") or {}
    ids = {role_of(name): int(i) for name, i in given.items()}
    corpus = Path(shard_dir).parent if shard_dir is not None else None
    source = _step_setting(corpus, "tokenizer", "source")
    if not ids and source == "bpe":
        ids = bpe_special_ids()
    missing = [role for role in REQUIRED_ROLES if role not in ids]
    if missing:
        where = Path(shard_dir) / MANIFEST if shard_dir is not None else "the shards manifest"
        flags = (f"--raw {_step_setting(corpus, 'read', 'raw') or 'RAW'} --out {corpus}"
                 + (f" --tokenizer {source}" if source and source != "bpe" else ""))
        raise ValueError(f"{where}: no special token ids recorded for {', '.join(missing)} (needed to mask and "
                         f"pad; a brought tokenizer numbers them its own way, so ids 0..4 are not assumed). "
                         f"Re-run the corpus command that wrote it, with the same flags (python -m data_prep "
                         f"corpus {flags} ...): it records the tokenizer's ids without rewriting the shards")
    return ids


def _step_setting(corpus: Path | None, step: str, name: str) -> str | None:
    """A setting of a corpus step's manifest (the tokenizer's ``source``: ``bpe`` or the brought tokenizer's
    directory; the read step's ``raw``), or None where there is none."""
    if corpus is None:
        return None
    try:
        return (read_manifest(corpus / step).get("settings") or {}).get(name)
    except (OSError, ValueError, RuntimeError):
        return None


def list_shards(shard_dir: str | Path, split: str, manifest: dict | None = None) -> list[ShardInfo]:
    """The split's shards in manifest order, with their sample counts; empty shards are left out."""
    shard_dir = Path(shard_dir)
    manifest = read_shards_manifest(shard_dir) if manifest is None else manifest
    entries = ((manifest.get("splits") or {}).get(split) or {}).get("shards")
    if entries is None:
        # A manifest without a shard list: take the split's files on disk in name order.
        entries = [{"file": p.name} for p in sorted((shard_dir / split).glob(SHARD_PATTERN.replace("{:06d}", "*")))]
    if not entries:
        raise ValueError(f"{shard_dir / MANIFEST}: no {split} shards listed (and none in {shard_dir / split})")
    shards, first_uid = [], 0
    for entry in entries:
        entry = {"file": entry} if isinstance(entry, str) else entry
        path = resolve_shard_path(shard_dir, split, entry["file"])
        # A count-less entry is counted from the tar itself (one pass over its headers).
        num = entry.get("num_samples")
        num = count_samples(path) if num is None else int(num)
        if num > 0:
            shards.append(ShardInfo(str(path), num, first_uid))
            first_uid += num
    return shards


def resolve_shard_path(shard_dir: Path, split: str, name: str) -> Path:
    """Manifest file names are relative to the split directory (``shard-000000.tar``) or to ``shard_dir``."""
    for path in (shard_dir / split / name, shard_dir / name):
        if path.is_file():
            return path
    raise ShardError(f"{shard_dir / split / name}: shard listed in {shard_dir / MANIFEST} does not exist")


def count_samples(path: str | Path) -> int:
    with open_shard(path) as tf:
        return sum(1 for _ in iter_sample_members(tf, str(path)))


def open_shard(path: str | Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: not a readable tar shard ({e})") from None


def iter_sample_members(tf: tarfile.TarFile, path: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) per sample, grouping consecutive members by key as webdataset does."""
    key, members = None, {}
    while True:
        try:
            info = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"{path}: corrupt or truncated shard after sample {key!r} ({e})") from None
        if info is None:
            break
        if not info.isfile():
            continue
        folder, _, base = info.name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            raise ShardError(f"{path}: member {info.name!r} has no extension; not a webdataset shard")
        name = f"{folder}/{stem}" if folder else stem
        if name != key:
            if key is not None:
                yield key, members
            key, members = name, {}
        members[ext] = info
    if key is not None:
        yield key, members


def decode_sample(tf: tarfile.TarFile, path: str, key: str, members: dict[str, tarfile.TarInfo],
                  vocab_size: int) -> tuple[np.ndarray, int]:
    """Token ids and language id of one sample, checked against the schema and the vocabulary."""
    missing = [ext for ext in (SAMPLE_IDS, SAMPLE_LANG) if ext not in members]
    if missing:
        raise ShardError(f"{path}: sample {key!r} lacks {missing} (has {sorted(members)})")
    try:
        ids = load_npy(tf.extractfile(members[SAMPLE_IDS]).read())
        lang = tf.extractfile(members[SAMPLE_LANG]).read().decode("utf-8").strip()
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: sample {key!r} is corrupt or truncated ({e})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) < 2:
        raise ShardError(f"{path}: sample {key!r}: {SAMPLE_IDS} must be a 1-D integer array of at least "
                         f"[CLS] [SEP], got shape {ids.shape} dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ShardError(f"{path}: sample {key!r} holds token id {int(ids.max())} outside the manifest's "
                         f"vocabulary of {vocab_size}")
    if lang not in LANG_TO_ID:
        raise ShardError(f"{path}: sample {key!r} has unknown language {lang!r}")
    return ids, LANG_TO_ID[lang]


_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \}")


def load_npy(raw: bytes) -> np.ndarray:
    """A 1-D integer array from ``.npy`` bytes.

    ``np.load`` parses the header with ``ast.literal_eval``, which costs more than everything else done with
    a sample; the headers ``np.save`` writes for 1-D integer arrays are parsed here with one pattern, and
    anything else goes to ``np.load``.
    """
    if raw[:8] == b"\x93NUMPY\x01\x00" and len(raw) >= 10:
        header_len = int.from_bytes(raw[8:10], "little")
        match = _NPY_HEADER.match(raw[10:10 + header_len].decode("latin1"))
        if match:
            dtype, length = np.dtype(match.group(1)), int(match.group(2))
            if len(raw) != 10 + header_len + length * dtype.itemsize:
                raise ValueError(f"npy data holds {len(raw) - 10 - header_len} bytes, header says {length} x {dtype}")
            return np.frombuffer(raw, dtype=dtype, count=length, offset=10 + header_len)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def read_segment(segment: Segment, vocab_size: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """(sample id, token ids, language id) of a segment; reads the shard to its end to check its count."""
    shard, path = segment.shard, segment.shard.path
    last = segment.start + (segment.count - 1) * segment.step
    num_found = 0
    with open_shard(path) as tf:
        for index, (key, members) in enumerate(iter_sample_members(tf, path)):
            num_found += 1
            if segment.start <= index <= last and (index - segment.start) % segment.step == 0:
                ids, lang_id = decode_sample(tf, path, key, members, vocab_size)
                yield shard.first_uid + index, ids, lang_id
    # tarfile takes a header it cannot parse past the first for the end of the archive: the count is
    # what tells a truncated or damaged shard from a short one.
    if num_found != shard.num_samples:
        raise ShardError(f"{path}: holds {num_found} readable samples but the manifest lists "
                         f"{shard.num_samples}: the shard is truncated or corrupt (or the manifest is stale)")


@dataclass(frozen=True)
class StreamPlan:
    """Everything that decides which samples a worker of a rank yields, in which order, in which batches."""

    shards: tuple[ShardInfo, ...]
    rank: int
    world_size: int
    num_workers: int
    """Logical workers per rank (at least 1; the calling process counts as one)."""
    micro_batch_size: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    epochs: int | None
    fixed_masks: bool
    max_len: int
    vocab_size: int
    special: dict

    def stream_index(self, worker: int) -> int:
        return self.rank * self.num_workers + worker

    def segments(self, epoch: int, worker: int) -> list[Segment]:
        shards = list(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, _SHARD_ORDER, epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        num_streams, index = self.world_size * self.num_workers, self.stream_index(worker)
        if len(shards) >= num_streams:
            return [Segment(s, 0, 1, s.num_samples) for s in shards[index::num_streams]]
        segments, offset = [], 0
        for s in shards:
            start = (index - offset) % num_streams
            count = len(range(start, s.num_samples, num_streams))
            if count:
                segments.append(Segment(s, start, num_streams, count))
            offset += s.num_samples
        return segments

    def num_batches(self, epoch: int, worker: int) -> int:
        return math.ceil(sum(s.count for s in self.segments(epoch, worker)) / self.micro_batch_size)

    def total_batches(self, worker: int) -> float:
        """Batches this worker yields over the whole run (infinite for an endless stream with data)."""
        if self.epochs is None:
            return math.inf if self.num_batches(0, worker) else 0
        return sum(self.num_batches(e, worker) for e in range(self.epochs))

    def samples(self, epoch: int, worker: int, skip: int) -> Iterator[tuple[int, np.ndarray, int]]:
        """The worker's samples of one epoch after the first ``skip``, decoding none of the skipped blocks."""
        block_size = self.shuffle_buffer
        # Unshuffled, every skipped sample is dropped by position; shuffled, whole blocks are, and the
        # rest of the block that was being emitted is read, permuted and cut.
        block, offset = divmod(skip, block_size) if self.shuffle else (0, 0)
        segments, to_drop = self.segments(epoch, worker), block * block_size if self.shuffle else skip
        while segments and segments[0].count <= to_drop:  # whole shards (or their parts) never opened
            to_drop -= segments.pop(0).count
        if segments:
            segments[0] = segments[0].skip(to_drop)
        source = chain.from_iterable(read_segment(s, self.vocab_size) for s in segments)
        if not self.shuffle:
            yield from source
            return
        while items := list(islice(source, block_size)):
            order = np.random.default_rng([self.seed, _BLOCK_ORDER, epoch, self.stream_index(worker), block])
            for i in order.permutation(len(items))[offset:]:
                yield items[i]
            block, offset = block + 1, 0

    def batches(self, worker: int, skip_batches: int, masker: Masker) -> Iterator[tuple[int, dict]]:
        """(epoch, batch) for one worker, after its first ``skip_batches`` batches."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            num = self.num_batches(epoch, worker)
            if num == 0 and self.epochs is None:
                return  # more sub-streams than samples: this one has none, in every epoch
            if skip_batches >= num:
                skip_batches -= num
            else:
                source = self.samples(epoch, worker, skip_batches * self.micro_batch_size)
                skip_batches = 0
                while chunk := list(islice(source, self.micro_batch_size)):
                    yield epoch, self.collate(chunk, epoch, masker)
            epoch += 1

    def collate(self, chunk: list[tuple[int, np.ndarray, int]], epoch: int, masker: Masker) -> dict:
        inputs, labels, langs = [], [], []
        mask_epoch = 0 if self.fixed_masks else epoch
        for uid, ids, lang_id in chunk:
            if len(ids) > self.max_len:
                ids = np.concatenate([ids[: self.max_len - 1], [self.special["sep"]]])
            x, y = masker.mask(ids, np.random.default_rng([self.seed, _MASKS, mask_epoch, uid]))
            inputs.append(x)
            labels.append(y)
            langs.append(lang_id)
        return pad_batch(inputs, labels, langs, self.special["pad"])


class ShardStream(IterableDataset):
    """The dataset each DataLoader worker runs: yields (logical worker, epoch, batch)."""

    def __init__(self, plan: StreamPlan, masker: Masker, skip_batches: list[int], first_worker: int):
        self.plan, self.masker = plan, masker
        self.skip_batches, self.first_worker = skip_batches, first_worker

    def __iter__(self):
        info = get_worker_info()
        # Rotating the workers makes the DataLoader's round robin resume at the worker that was due next.
        worker = ((info.id if info else 0) + self.first_worker) % self.plan.num_workers
        for epoch, batch in self.plan.batches(worker, self.skip_batches[worker], self.masker):
            yield worker, epoch, batch


def resume_point(totals: list[float], num_batches: int) -> tuple[list[int], int]:
    """Per-worker batch counts after ``num_batches`` taken round robin, and the worker due next.

    Workers that have run out are passed over, as the DataLoader does.
    """
    counts, left, num_workers = [0] * len(totals), num_batches, len(totals)
    due = 0
    while left > 0:
        active = [w for w in range(num_workers) if totals[w] - counts[w] > 0]
        if not active:
            raise ValueError(f"the state is {num_batches} batches in, but the stream holds only "
                             f"{sum(counts)}")
        rounds = min(left // len(active), min(totals[w] - counts[w] for w in active))
        if rounds:
            for w in active:
                counts[w] += int(rounds)
            left -= int(rounds) * len(active)
            continue
        for w in active:  # fewer batches left than active workers: a part of one round
            if left == 0:
                break
            counts[w], left, due = counts[w] + 1, left - 1, w + 1
    active = [w for w in range(num_workers) if totals[w] - counts[w] > 0]
    after = [w for w in active if w >= due] + [w for w in active if w < due]
    return counts, (after[0] if after else 0)


class ShardReader:
    """Iterable of MLM batches for one global rank; resumable with :meth:`state_dict`.

    Each batch is a dict of ``input_ids``, ``attention_mask``, ``labels`` (``-100`` where not predicted),
    all ``[B, T]`` long tensors with T the longest sequence of the batch, and ``lang_ids`` ``[B]`` (indices
    into :data:`ds_kd.schema.LANGS`). Iterating again continues where the last iteration stopped.
    """

    def __init__(self, cfg: ReaderConfig, rank: int = 0, world_size: int = 1):
        check_config(cfg, rank, world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest = read_shards_manifest(cfg.shard_dir)
        shards = list_shards(cfg.shard_dir, cfg.split, self.manifest)
        self.vocab_size = manifest_vocab_size(self.manifest, cfg.shard_dir, shards)
        special = special_ids(self.manifest, cfg.shard_dir)
        shuffle = cfg.split == "train" if cfg.shuffle is None else cfg.shuffle
        epochs = cfg.epochs if cfg.epochs is not None or cfg.split == "train" else 1
        self._plan = StreamPlan(tuple(shards), rank, world_size, max(cfg.num_workers, 1), cfg.micro_batch_size,
                                cfg.seed, shuffle, cfg.shuffle_buffer, epochs, cfg.split != "train", cfg.max_len,
                                self.vocab_size, special)
        self._masker = Masker(cfg.masking, self.vocab_size, special.values(), special["mask"])
        self._totals = [self._plan.total_batches(w) for w in range(self._plan.num_workers)]
        if epochs is None and not any(self._totals):
            raise ValueError(f"rank {rank} of {world_size} gets no {cfg.split} samples: the split holds "
                             f"{self.num_samples}, fewer than ranks x workers")
        self._num_batches, self.epoch = 0, 0
        self._batches_per_worker = [0] * self._plan.num_workers

    @property
    def num_samples(self) -> int:
        """Samples of this split in the manifest (all ranks together)."""
        return sum(s.num_samples for s in self._plan.shards)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Batches this rank yields in ``epoch`` (ranks can differ by a few when shards are uneven)."""
        return sum(self._plan.num_batches(epoch, w) for w in range(self._plan.num_workers))

    def __iter__(self) -> Iterator[dict]:
        skip, first_worker = resume_point(self._totals, self._num_batches)
        stream = ShardStream(self._plan, self._masker, skip, first_worker)
        num_workers = self.cfg.num_workers
        # Workers seed themselves from the reader's own seeds; a private generator keeps DataLoader from
        # drawing its base seed from the global RNG, which would shift dropout after a resume.
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=self.cfg.pin_memory,
                            prefetch_factor=self.cfg.prefetch_factor if num_workers else None,
                            generator=torch.Generator())
        batches = iter(loader)
        try:
            for worker, epoch, batch in batches:
                self._num_batches += 1
                self._batches_per_worker[worker] += 1
                self.epoch = epoch
                yield batch
        finally:
            # Stop the workers now, also after an error or an early break. Left to the garbage collector
            # (a worker's error keeps the iterator referenced from its traceback), the DataLoader waits
            # seconds for each worker before terminating it.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _fingerprint(self) -> dict:
        p = self._plan
        return {"split": self.cfg.split, "seed": p.seed, "world_size": p.world_size, "num_workers": p.num_workers,
                "micro_batch_size": p.micro_batch_size, "shuffle": p.shuffle, "shuffle_buffer": p.shuffle_buffer,
                "max_len": p.max_len, "masking": asdict(self.cfg.masking), "num_samples": self.num_samples,
                "num_shards": len(p.shards)}

    def state_dict(self) -> dict:
        """Position in the stream (JSON-serialisable): the batches this rank has handed out, and the settings.

        Ranks that step together hold the same ``num_batches``, so one rank's state resumes every rank.
        """
        return {"version": STATE_VERSION, "num_batches": self._num_batches, "epoch": self.epoch,
                "rank": self.rank, "batches_per_worker": list(self._batches_per_worker), **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["num_batches"]`` batches; the settings that shape the stream must match."""
        mine = self._fingerprint()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"cannot resume the {self.cfg.split} stream of {self.cfg.shard_dir} exactly: {detail}")
        counts, _ = resume_point(self._totals, int(state["num_batches"]))
        if state.get("rank") == self.rank and state.get("batches_per_worker", counts) != counts:
            raise ValueError(f"saved per-worker batch counts {state['batches_per_worker']} do not follow from "
                             f"{state['num_batches']} batches ({counts}): the state belongs to another stream")
        self._num_batches, self.epoch = int(state["num_batches"]), int(state.get("epoch", 0))
        self._batches_per_worker = counts


def check_config(cfg: ReaderConfig, rank: int, world_size: int) -> None:
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {cfg.split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    for name in ("micro_batch_size", "shuffle_buffer"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.max_len < 2:
        raise ValueError(f"max_len must be at least 2 ([CLS] and [SEP]), got {cfg.max_len}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"epochs must be at least 1 or None (endless), got {cfg.epochs}")


def manifest_vocab_size(manifest: dict, shard_dir: str | Path, shards: list[ShardInfo]) -> int:
    if "vocab_size" in manifest:
        return int(manifest["vocab_size"])
    # No vocabulary size recorded: the largest id in the shards bounds it from below. Random replacement
    # tokens then come from the ids the corpus uses, which is all it can know.
    warnings.warn(f"{Path(shard_dir) / MANIFEST} has no vocab_size; scanning the shards for the largest id")
    largest = 0
    for shard in shards:
        for _, ids, _ in read_segment(Segment(shard, 0, 1, shard.num_samples), vocab_size=2**31 - 1):
            largest = max(largest, int(ids.max()))
    return largest + 1
