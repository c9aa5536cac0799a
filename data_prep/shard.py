"""Step 4 of the corpus: tokenize the mix with every core and write block shards (schema: :mod:`ds_kd.schema`).

The main process streams ``train.tsv`` / ``val.tsv`` in the mix's (shuffled) order, cuts it into blocks of
``block_size`` lines and hands them to a pool of worker processes, at most two blocks per worker in flight, so
memory does not grow with the corpus. A worker tokenizes its block and returns the block's tar members as
bytes; the main process appends the blocks in order to the current shard and closes it once it holds
``shard_mb`` MiB. A shard is written under a temporary name, its record (counts, bytes, sha256, block table)
goes to ``.progress/``, then it is renamed. A re-run after an interruption skips the blocks of the finished
shards without tokenizing them and writes the rest: the same bytes as an uninterrupted run, no sentence written
twice and none lost.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import tarfile
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ds_kd.errors import UsageError
from tqdm import tqdm

from ds_kd.manifest import atomic_write_text
from ds_kd.schema import (BLOCK_LANGS, BLOCK_OFFSETS, BLOCK_TOKENS, LANGS, SCHEMA_VERSION, SHARD_PATTERN,
                          block_key, check_langs, token_dtype)
from ds_kd.data.tokenizer_files import read_tokenizer_json

PROGRESS_DIR = ".progress"
END_OF_ARCHIVE = b"\0" * 1024  # two zero blocks


@dataclass(frozen=True)
class ShardConfig:
    """How shards are written."""

    block_size: int = 8192
    """Sentences per block (one tar sample); the split's last block may hold fewer."""
    shard_mb: float = 128.0
    """A shard is closed once it holds this many MiB (so shards are this size or one block more)."""
    num_workers: int = 0
    """Tokenizing processes; 0: one per CPU core."""
    batch_size: int = 1000
    """Sentences per ``encode_batch`` call inside a worker."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise UsageError(f"block_size must be at least 1 sentence, got {self.block_size}")
        if self.shard_mb <= 0:
            raise UsageError(f"shard_mb must be positive, got {self.shard_mb}")


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of a 1-D array, byte for byte (format 1.0), without its per-call overhead."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (array.dtype.str, len(array))
    header += " " * (63 - (10 + len(header)) % 64) + "\n"  # pad so the data starts at a multiple of 64
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + array.tobytes()


def _ustar_template() -> bytes:
    info = tarfile.TarInfo("x")
    info.mtime, info.mode, info.size = 0, 0o644, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


_TEMPLATE = _ustar_template()  # fixed fields (mode, owner, mtime 0): same input, same bytes
_BLANK_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[148:156]) + 8 * 32 - sum(_TEMPLATE[:100]) - sum(_TEMPLATE[124:136])


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512 bytes); tarfile's TarInfo is 5x slower per member."""
    raw_name = name.encode("utf-8")
    if len(raw_name) > 100:
        raise ValueError(f"tar member name over 100 bytes: {name}")
    size = b"%011o\0" % len(data)
    checksum = _BLANK_SUM + sum(raw_name) + sum(size)
    header = (raw_name.ljust(100, b"\0") + _TEMPLATE[100:124] + size + _TEMPLATE[136:148]
              + b"%06o\0 " % checksum + _TEMPLATE[156:])
    return header + data + b"\0" * (-len(data) % 512)


@dataclass
class EncodedBlock:
    """One block's tar members as bytes, with its counts."""

    index: int
    data: bytes
    num_samples: int
    num_tokens: int
    per_lang: dict[str, int]
    crc32: int


def encode_block(index: int, sentences: Sequence[Sequence[int]], langs: Sequence[str], dtype: str,
                 vocab_size: int, lang_codes: Sequence[str] = LANGS) -> EncodedBlock:
    """The tar members of block ``index`` holding ``sentences`` (token ids with [CLS]/[SEP]) of ``langs``;
    a sentence's language is stored as its index in ``lang_codes`` (the manifest's, at most 256).

    Raises ValueError for a language code outside ``lang_codes`` or a token id outside the vocabulary."""
    if len(sentences) != len(langs) or not sentences:
        raise ValueError(f"block {index}: {len(sentences)} sentences but {len(langs)} languages")
    lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
    offsets = np.zeros(len(sentences) + 1, dtype="<u4")
    if int(lengths.sum()) >= 2**32:
        raise ValueError(f"block {index} holds {int(lengths.sum())} tokens, over the 2^32 its offsets can count")
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(sentences), dtype=np.int64, count=int(offsets[-1]))
    if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"block {index}: token id {int(flat.max())} outside the vocabulary of {vocab_size}")
    lang_to_id = {lang: i for i, lang in enumerate(lang_codes)}
    try:
        lang_ids = np.fromiter((lang_to_id[lang] for lang in langs), dtype=np.uint8, count=len(langs))
    except KeyError as e:
        raise ValueError(f"block {index}: language code {e.args[0]!r} is not one of the corpus's "
                         f"{' '.join(lang_codes)}") from None
    key = block_key(index)
    data = b"".join(tar_member(f"{key}.{name}", npy_bytes(array)) for name, array in (
        (BLOCK_TOKENS, flat.astype(dtype)), (BLOCK_OFFSETS, offsets), (BLOCK_LANGS, lang_ids)))
    return EncodedBlock(index, data, len(sentences), int(offsets[-1]), dict(Counter(langs)), zlib.crc32(data))


@dataclass
class ShardWriter:
    """Appends encoded blocks, in order, to the shards of one split; closes a shard at ``shard_bytes``.

    Each closed shard's record (its counts, bytes, sha256 and block table) is written to ``.progress/``
    before the shard is renamed into place, so a shard that exists always has its record."""

    split_dir: Path
    shard_bytes: int
    settings: dict
    """Recorded with every shard: a re-run with other settings must not continue these shards."""
    next_shard: int = 0
    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._file = None
        (self.split_dir.parent / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)

    def add(self, block: EncodedBlock) -> None:
        if self._file is None:
            self._open()
        self._blocks.append((block.num_samples, self._size, block.crc32))
        self._file.write(block.data)
        self._sha.update(block.data)
        self._size += len(block.data)
        self._num_tokens += block.num_tokens
        self._per_lang.update(block.per_lang)
        if self._size >= self.shard_bytes:
            self.close_shard()

    def _open(self) -> None:
        self._name = SHARD_PATTERN.format(self.next_shard)
        self._tmp = self.split_dir / f".{self._name}.tmp{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._sha, self._size, self._num_tokens = hashlib.sha256(), 0, 0
        self._blocks: list[tuple[int, int, int]] = []
        self._per_lang: Counter = Counter()

    def close_shard(self) -> None:
        """Finish the open shard (if any): end-of-archive marker, fsync, record, rename."""
        if self._file is None:
            return
        self._file.write(END_OF_ARCHIVE)
        self._sha.update(END_OF_ARCHIVE)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        counts, offsets, crcs = (list(column) for column in zip(*self._blocks))
        record = {"file": self._name, "num_samples": sum(counts), "num_tokens": self._num_tokens,
                  "num_bytes": self._size + len(END_OF_ARCHIVE), "sha256": self._sha.hexdigest(),
                  "per_lang": dict(sorted(self._per_lang.items())),
                  "blocks": {"num_samples": counts, "offset": offsets, "crc32": crcs}, **self.settings}
        atomic_write_text(progress_path(self.split_dir, self.next_shard), json.dumps(record) + "\n")
        os.replace(self._tmp, self.split_dir / self._name)
        self.records.append(record)
        self.next_shard += 1


def progress_path(split_dir: Path, shard_index: int) -> Path:
    return split_dir.parent / PROGRESS_DIR / f"{split_dir.name}-{shard_index:06d}.json"


def finished_records(split_dir: Path, settings: dict) -> list[dict]:
    """Records of the shards an earlier, interrupted run finished (in order, up to the first missing one).

    A finished shard written with other settings (tokenizer, block size, shard size, language codes) is an
    error. A record without language codes was written when blocks indexed the paper's eight."""
    records = []
    while True:
        index = len(records)
        shard, progress = split_dir / SHARD_PATTERN.format(index), progress_path(split_dir, index)
        if not (shard.is_file() and progress.is_file()):
            return records
        record = {"lang_codes": list(LANGS), **json.loads(progress.read_text(encoding="utf-8"))}
        differ = {k: (record.get(k), v) for k, v in settings.items() if record.get(k) != v}
        if differ:
            raise UsageError(f"{shard}: written by an earlier run with other settings {differ} (recorded, now); "
                             f"delete {split_dir.parent} to rewrite the shards")
        if shard.stat().st_size != record["num_bytes"]:
            return records  # damaged after its record was written: write it again, and what follows
        records.append(record)


_TOKENIZER = None


def init_worker(tokenizer_file: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parallelism is the process pool
    _TOKENIZER = read_tokenizer_json(tokenizer_file)  # a brought file's padding and truncation off


@dataclass(frozen=True)
class BlockJob:
    """One block to tokenize: its index in the split and its lines (``lang<TAB>sentence``)."""

    index: int
    lines: list[str]
    dtype: str
    vocab_size: int
    lang_codes: tuple[str, ...] = LANGS
    """The corpus's languages: a sentence's language is stored as its index here."""


def tokenize_block(job: BlockJob, batch_size: int = 1000) -> EncodedBlock:
    """Tokenize a block's lines (in a worker that ran :func:`init_worker`) and encode the block."""
    langs, sentences = [], []
    for start in range(0, len(job.lines), batch_size):
        texts = []
        for line in job.lines[start:start + batch_size]:
            lang, tab, text = line.partition("\t")
            if not tab:
                raise ValueError(f"block {job.index}: line {line[:80]!r} is not lang<TAB>sentence")
            langs.append(lang)
            texts.append(text)
        sentences.extend(enc.ids for enc in _TOKENIZER.encode_batch(texts))
    return encode_block(job.index, sentences, langs, job.dtype, job.vocab_size, job.lang_codes)


def iter_blocks(path: Path, block_size: int) -> Iterator[tuple[int, list[str]]]:
    """(block index, lines) runs of a ``lang<TAB>sentence`` file, streaming."""
    chunk: list[str] = []
    index = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            chunk.append(line.rstrip("\n"))
            if len(chunk) == block_size:
                yield index, chunk
                index, chunk = index + 1, []
    if chunk:
        yield index, chunk


def write_split(pool, num_workers: int, mix_file: Path, split_dir: Path, settings: dict, config: ShardConfig,
                vocab_size: int, total: int | None = None, lang_codes: tuple[str, ...] = LANGS) -> list[dict]:
    """Write all shards of one split with ``pool`` and return their records in shard order."""
    split_dir.mkdir(parents=True, exist_ok=True)
    done = finished_records(split_dir, settings)
    skip = sum(len(r["blocks"]["num_samples"]) for r in done)
    writer = ShardWriter(split_dir, int(config.shard_mb * 2**20), settings, next_shard=len(done))
    dtype = token_dtype(vocab_size)
    bar = tqdm(total=total, unit="sent", unit_scale=True, desc=f"shard {split_dir.name}")
    in_flight: deque = deque()

    def collect() -> None:
        block = in_flight.popleft().get()
        writer.add(block)
        bar.update(block.num_samples)

    for index, lines in iter_blocks(mix_file, config.block_size):
        if index < skip:  # in a shard an earlier run finished: not tokenized again
            bar.update(len(lines))
            continue
        in_flight.append(pool.apply_async(tokenize_block, (BlockJob(index, lines, dtype, vocab_size, lang_codes),
                                                           config.batch_size)))
        while len(in_flight) >= 2 * num_workers:  # bounded: the reader never runs far ahead of the workers
            collect()
    while in_flight:
        collect()
    writer.close_shard()
    bar.close()
    return done + writer.records


SHARD_FIELDS = ("file", "num_samples", "num_tokens", "num_bytes", "sha256", "per_lang", "blocks")


def summarize(records: list[dict]) -> dict:
    """A split's manifest entry from its shard records."""
    per_lang: Counter = Counter()
    for record in records:
        per_lang.update(record["per_lang"])
    return {"num_samples": sum(r["num_samples"] for r in records),
            "num_tokens": sum(r["num_tokens"] for r in records),
            "num_blocks": sum(len(r["blocks"]["num_samples"]) for r in records),
            "num_bytes": sum(r["num_bytes"] for r in records),
            "per_lang": dict(sorted(per_lang.items())),
            "shards": [{k: r[k] for k in SHARD_FIELDS} for r in records]}


def layout_fields(vocab_size: int, config: ShardConfig, lang_codes: Sequence[str] = LANGS) -> dict:
    """The manifest fields that describe the layout (besides the splits); ``lang_codes``: the corpus's
    languages, whose indices the blocks store. ValueError (naming --langs) for codes that are not."""
    check_langs(list(lang_codes))
    return {"schema_version": SCHEMA_VERSION, "lang_codes": list(lang_codes), "token_dtype": token_dtype(vocab_size),
            "block_size": config.block_size}


def write_shards(sample_dir: Path, tokenizer_dir: Path, out_dir: Path, tokenizer_hash: str, vocab_size: int,
                 config: ShardConfig, split_sizes: dict[str, int], lang_codes: Sequence[str] = LANGS) -> dict:
    """Write train and val shards of a mix in ``lang_codes`` (the corpus's languages, in ``--langs`` order);
    returns the manifest fields (layout, splits) and the throughput."""
    layout = layout_fields(vocab_size, config, lang_codes)
    splits = {}
    start = time.perf_counter()
    num_workers = config.num_workers or os.cpu_count() or 1
    settings = {"tokenizer_hash": tokenizer_hash, "block_size": config.block_size, "shard_mb": config.shard_mb,
                "lang_codes": list(lang_codes)}  # what the blocks' language ids index: never mixed in one split
    ctx = mp.get_context("spawn")  # no fork of a process that may hold tokenizers' threads
    with ctx.Pool(num_workers, initializer=init_worker, initargs=(str(tokenizer_dir / "tokenizer.json"),)) as pool:
        for split, name in (("train", "train.tsv"), ("val", "val.tsv")):
            records = write_split(pool, num_workers, sample_dir / name, out_dir / split, settings, config,
                                  vocab_size, split_sizes.get(split), tuple(lang_codes))
            splits[split] = summarize(records)
    seconds = time.perf_counter() - start
    num = sum(s["num_samples"] for s in splits.values())
    return {**layout, "splits": splits, "seconds": round(seconds, 2),
            "sentences_per_s": round(num / max(seconds, 1e-9), 1)}
