"""The block shards on disk (schema: :mod:`ds_kd.schema`): the manifest, the table of every block of a split,
and reading one block with its checks.

Opening a split stats every shard (it must exist with the size the manifest lists); reading a block checks its
crc32 against the manifest and its structure (offsets rising from 0 to the token count by at least 2, every
sentence ``[CLS] ... [SEP]``, ids inside the vocabulary, language indices inside the manifest's ``lang_codes``);
any failure raises :class:`ShardError` naming the shard and the block. :func:`verify_shards` hashes whole
shards against the manifest's sha256.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ds_kd.errors import UsageError
from ds_kd.manifest import MANIFEST, read_manifest
from ds_kd.schema import (BLOCK_MEMBERS, LANGS, REQUIRED_ROLES, REWRITE_HINT, SCHEMA_VERSION, SPLITS, block_key,
                          bpe_special_ids, check_langs, role_of)


class ShardError(RuntimeError):
    """A shard file is missing, corrupt, truncated or disagrees with the manifest. The message names it
    (and the block)."""


def read_shards_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shards directory, checked to be of the current schema.

    Raises :class:`ds_kd.manifest.MissingStageError` naming it when absent, ValueError naming the command that
    rewrites the shards when they are of an older schema."""
    manifest = read_manifest(shard_dir, needed_by="the shard reader (ds_kd.data.reader); write the shards with "
                                                  "`python -m data_prep corpus`")
    version = manifest.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        raise UsageError(f"{Path(shard_dir) / MANIFEST}: shards of schema version {version} (one sentence per "
                         f"tar member), but this reader reads version {SCHEMA_VERSION} (blocks of sentences): "
                         f"{REWRITE_HINT}")
    return manifest


def lang_codes(manifest: dict, shard_dir: str | Path | None = None) -> tuple[str, ...]:
    """The corpus's languages: a block's and a batch's language ids index this tuple. The manifest's
    ``lang_codes`` (written by every version; the paper's eight where an older manifest lacks it). Raises
    ValueError naming the manifest for codes of another form, repeated codes or more than 256."""
    codes = tuple(manifest.get("lang_codes") or LANGS)
    try:
        check_langs(codes, "lang_codes")
    except ValueError as e:
        where = Path(shard_dir) / MANIFEST if shard_dir is not None else "the shards manifest"
        raise UsageError(f"{where}: {e}") from None
    return codes


def check_vocab(shard_dir: str | Path, vocab_size: int, what: str = "model") -> None:
    """Raise ValueError naming the manifest when ``vocab_size`` differs from the one the shards hold."""
    manifest = read_shards_manifest(shard_dir)
    if int(manifest["vocab_size"]) != int(vocab_size):
        raise UsageError(f"the {what} has a vocabulary of {vocab_size} tokens but the shards were written "
                         f"with {manifest['vocab_size']} (see {Path(shard_dir) / MANIFEST}); use the corpus's "
                         f"own tokenizer or rewrite the shards")


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
        raise UsageError(f"{_where(shard_dir)}: no special token ids recorded for {', '.join(missing)} (needed to "
                         f"mask and pad; a brought tokenizer numbers them its own way, so ids 0..4 are not "
                         f"assumed). {_rerun_hint(corpus, source)}")
    return ids


def unmasked_ids(manifest: dict, shard_dir: str | Path | None = None) -> list[int]:
    """Every special token id of the shards' tokenizer, ascending: the roles of :func:`special_ids` and the
    manifest's ``all_special_ids`` (added special tokens too: language or task tags). MLM masking never
    selects these and never draws them as random replacements. Raises ValueError naming the manifest and the
    command that records them when a brought tokenizer's manifest (of an older version) lacks the list; the
    project's own BPE has no special token beyond its roles."""
    corpus = Path(shard_dir).parent if shard_dir is not None else None
    recorded = manifest.get("all_special_ids")
    source = _step_setting(corpus, "tokenizer", "source")
    if recorded is None and source not in (None, "bpe"):
        raise UsageError(f"{_where(shard_dir)}: no all_special_ids recorded (every special token of the brought "
                         f"tokenizer, language tags included, which masking must leave alone). "
                         f"{_rerun_hint(corpus, source)}")
    return sorted({*special_ids(manifest, shard_dir).values(), *map(int, recorded or ())})


def _where(shard_dir: str | Path | None) -> str:
    return str(Path(shard_dir) / MANIFEST) if shard_dir is not None else "the shards manifest"


def _rerun_hint(corpus: Path | None, source: str | None) -> str:
    """What to run so that the corpus command records the tokenizer's special ids in finished manifests."""
    flags = (f"--raw {_step_setting(corpus, 'read', 'raw') or 'RAW'} --out {corpus}"
             + (f" --tokenizer {source}" if source and source != "bpe" else ""))
    return (f"Re-run the corpus command that wrote it, with the same flags (python -m data_prep corpus {flags} "
            f"...): it records the tokenizer's ids without rewriting the shards")


def _step_setting(corpus: Path | None, step: str, name: str) -> str | None:
    """A setting of a corpus step's manifest (the tokenizer's ``source``: ``bpe`` or the brought tokenizer's
    directory; the read step's ``raw``), or None where there is none."""
    if corpus is None:
        return None
    try:
        return (read_manifest(corpus / step).get("settings") or {}).get(name)
    except (OSError, ValueError, RuntimeError):
        return None


class Block(NamedTuple):
    """One block's arrays: ``tokens`` [num_tokens], ``offsets`` [num_sentences + 1], ``langs`` [num_sentences]."""

    tokens: np.ndarray
    offsets: np.ndarray
    langs: np.ndarray


@dataclass(frozen=True)
class BlockTable:
    """Every block of one split: its shard file, byte range, crc32 and sentence count, in manifest order.

    Opening checks that every shard exists with the size the manifest lists; :meth:`read` checks a block's
    crc32 and structure and raises :class:`ShardError` naming the shard and the block."""

    paths: tuple[str, ...]
    shard: np.ndarray
    """[num_blocks] index into ``paths``."""
    local: np.ndarray
    """[num_blocks] index of the block within its shard."""
    start: np.ndarray
    """[num_blocks] byte offset of the block's first member header in its shard."""
    end: np.ndarray
    """[num_blocks] byte offset one past the block's last member."""
    crc32: np.ndarray
    num_sentences: np.ndarray
    """[num_blocks] sentences per block."""
    first_sentence: np.ndarray
    """[num_blocks + 1] sentence id of each block's first sentence; the last entry is the split's total."""
    vocab_size: int
    cls_id: int
    sep_id: int
    num_langs: int = len(LANGS)
    """Languages of the corpus (the manifest's ``lang_codes``): a block's language ids are below this."""

    @classmethod
    def open(cls, shard_dir: str | Path, split: str, manifest: dict) -> "BlockTable":
        shard_dir = Path(shard_dir)
        entries = ((manifest.get("splits") or {}).get(split) or {}).get("shards")
        if not entries:
            raise UsageError(f"{shard_dir / MANIFEST}: no {split} shards listed")
        paths, columns = [], {k: [] for k in ("shard", "local", "start", "end", "crc32", "num_sentences")}
        for index, entry in enumerate(entries):
            path = shard_dir / split / entry["file"]
            check_shard_file(path, entry, shard_dir / MANIFEST)
            blocks = entry["blocks"]
            starts = list(blocks["offset"])
            ends = starts[1:] + [entry["num_bytes"] - 1024]  # the last block ends at the end-of-archive marker
            for name, values in (("shard", [index] * len(starts)), ("local", range(len(starts))),
                                 ("start", starts), ("end", ends), ("crc32", blocks["crc32"]),
                                 ("num_sentences", blocks["num_samples"])):
                columns[name].extend(values)
            paths.append(str(path))
        counts = np.asarray(columns["num_sentences"], dtype=np.int64)
        special = special_ids(manifest, shard_dir)
        return cls(tuple(paths), np.asarray(columns["shard"], np.int32), np.asarray(columns["local"], np.int32),
                   np.asarray(columns["start"], np.int64), np.asarray(columns["end"], np.int64),
                   np.asarray(columns["crc32"], np.uint32), counts,
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), int(manifest["vocab_size"]),
                   special["cls"], special["sep"], len(lang_codes(manifest, shard_dir)))

    @property
    def num_blocks(self) -> int:
        return len(self.num_sentences)

    @property
    def num_sentences_total(self) -> int:
        return int(self.first_sentence[-1])

    def block_of(self, sentence_ids: np.ndarray) -> np.ndarray:
        """The block holding each sentence id."""
        return np.searchsorted(self.first_sentence, sentence_ids, side="right") - 1

    def where(self, block: int) -> str:
        return f"{self.paths[self.shard[block]]}: block {self.local[block]} ({block_key(block)})"

    def read(self, block: int) -> Block:
        """Read, check and decode one block (zero-copy views of the bytes read)."""
        start, end = int(self.start[block]), int(self.end[block])
        try:
            with open(self.paths[self.shard[block]], "rb") as f:
                f.seek(start)
                raw = f.read(end - start)
        except OSError as e:
            raise ShardError(f"{self.where(block)}: cannot be read ({e})") from None
        if len(raw) != end - start:
            raise ShardError(f"{self.where(block)}: truncated, {len(raw)} of its {end - start} bytes present")
        if zlib.crc32(raw) != int(self.crc32[block]):
            raise ShardError(f"{self.where(block)}: its bytes do not match the manifest's crc32: the shard is "
                             f"corrupt or was rewritten after the manifest")
        members = split_members(raw, self.where(block))
        expected = [f"{block_key(block)}.{name}" for name in BLOCK_MEMBERS]
        if list(members) != expected:
            raise ShardError(f"{self.where(block)}: holds members {list(members)}, expected {expected}")
        try:
            arrays = Block(*(load_npy(members[name]) for name in expected))
        except ValueError as e:
            raise ShardError(f"{self.where(block)}: a member is not a 1-D .npy array ({e})") from None
        self.check(block, arrays)
        return arrays

    def check(self, block: int, b: Block) -> None:
        """Raise ShardError unless the arrays form the block the manifest describes."""
        num = int(self.num_sentences[block])
        problem = None
        if b.tokens.dtype.kind != "u" or b.offsets.dtype.kind != "u" or b.langs.dtype.kind != "u":
            problem = f"dtypes {b.tokens.dtype}/{b.offsets.dtype}/{b.langs.dtype}, expected unsigned integers"
        elif len(b.offsets) != num + 1 or len(b.langs) != num:
            problem = (f"{len(b.offsets)} offsets and {len(b.langs)} languages, the manifest lists {num} "
                       f"sentences (expected {num + 1} offsets)")
        elif b.offsets[0] != 0 or b.offsets[-1] != len(b.tokens) or (np.diff(b.offsets.astype(np.int64)) < 2).any():
            problem = (f"offsets disagree with the tokens: they must rise by at least 2 from 0 to the "
                       f"{len(b.tokens)} tokens, got {b.offsets[:3].tolist()}...{b.offsets[-2:].tolist()}")
        elif (b.tokens[b.offsets[:-1]] != self.cls_id).any() or (b.tokens[b.offsets[1:] - 1] != self.sep_id).any():
            problem = "offsets disagree with the tokens: a sentence does not start with [CLS] and end with [SEP]"
        elif len(b.tokens) and int(b.tokens.max()) >= self.vocab_size:
            problem = f"token id {int(b.tokens.max())} outside the manifest's vocabulary of {self.vocab_size}"
        elif len(b.langs) and int(b.langs.max()) >= self.num_langs:
            problem = (f"language index {int(b.langs.max())} outside the manifest's {self.num_langs} language "
                       f"codes (lang_codes)")
        if problem:
            raise ShardError(f"{self.where(block)}: {problem}")


def check_shard_file(path: Path, entry: dict, manifest_path: Path) -> None:
    """A listed shard must exist with the listed size (a stat, not a read)."""
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in {manifest_path} does not exist")
    size = path.stat().st_size
    if size != entry["num_bytes"]:
        ends = entry["blocks"]["offset"][1:] + [entry["num_bytes"] - 1024]
        cut = next((i for i, end in enumerate(ends) if end > size), None)
        where = f" (truncated from block {cut} on)" if cut is not None and size < entry["num_bytes"] else ""
        raise ShardError(f"{path}: holds {size} bytes but {manifest_path} lists {entry['num_bytes']}{where}: the "
                         f"shard is truncated or was rewritten after the manifest")


def verify_shards(shard_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> int:
    """Hash every shard in full and compare with the manifest's sha256; returns the bytes hashed.

    Reading checks each block's crc32 as it goes; this checks whole files, e.g. after copying a corpus."""
    shard_dir = Path(shard_dir)
    manifest = read_shards_manifest(shard_dir)
    total = 0
    for split in splits:
        for entry in (manifest["splits"].get(split) or {}).get("shards", []):
            path = shard_dir / split / entry["file"]
            check_shard_file(path, entry, shard_dir / MANIFEST)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise ShardError(f"{path}: sha256 {digest.hexdigest()} differs from the {entry['sha256']} listed in "
                                 f"{shard_dir / MANIFEST}: the shard is corrupt or was rewritten")
            total += entry["num_bytes"]
    return total


def split_members(raw: bytes, where: str) -> dict[str, bytes]:
    """The (name, data) of the ustar members in ``raw``, in order."""
    members, pos = {}, 0
    while pos + 512 <= len(raw):
        header = raw[pos:pos + 512]
        try:
            name = header[:100].rstrip(b"\0").decode("utf-8")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except (UnicodeDecodeError, ValueError):
            raise ShardError(f"{where}: no tar member header at byte {pos} of the block") from None
        if pos + 512 + size > len(raw):
            raise ShardError(f"{where}: member {name!r} runs past the end of the block")
        members[name] = raw[pos + 512:pos + 512 + size]
        pos += 512 + size + (-size % 512)
    return members


_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \}")


def load_npy(raw: bytes) -> np.ndarray:
    """A 1-D integer array from ``.npy`` bytes, as a view of them.

    ``np.load`` parses the header with ``ast.literal_eval``; the headers written for 1-D integer arrays are
    parsed here with one pattern, and anything else is refused."""
    if raw[:8] not in (b"\x93NUMPY\x01\x00",) or len(raw) < 10:
        raise ValueError("not a version 1.0 .npy file")
    header_len = int.from_bytes(raw[8:10], "little")
    match = _NPY_HEADER.match(raw[10:10 + header_len].decode("latin1"))
    if not match:
        raise ValueError(f"not a 1-D integer array: header {raw[10:10 + header_len][:80]!r}")
    dtype, length = np.dtype(match.group(1)), int(match.group(2))
    if len(raw) != 10 + header_len + length * dtype.itemsize:
        raise ValueError(f"holds {len(raw) - 10 - header_len} data bytes, header says {length} x {dtype}")
    return np.frombuffer(raw, dtype=dtype, count=length, offset=10 + header_len)
