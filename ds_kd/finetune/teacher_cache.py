"""The teacher-output cache of XtremeDistil's transfer stages (``launch/task_distill.py --transfer-rows N``).

Online (``--transfer-rows 0``, the default) the frozen teacher runs on every transfer batch of stages 1 and 2.
With ``N > 0`` it labels the first ``nb = ceil(N / transfer_batch)`` global batches of the transfer order once,
and transfer step ``t`` of the run (a counter over the steps of stages 1 and 2 together) reads cached batch
:func:`batch_index` ``(t, nb, seed)``: batch ``t`` while ``t < nb`` (the batches the online run reads, in its
order: the two modes give the same steps until then), and for each later pass over the cache (``epoch = t //
nb``) a permutation of ``range(nb)`` that is a pure function of (seed, epoch), with the run's ``--seed`` (the
transfer order itself, and so which rows are cached, follows ``--transfer-seed``, by default the same).

**What a global batch holds** (one file each, ``batch_000123.pt``): the student's inputs (``input_ids``,
``attention_mask``, and ``position_ids``/``sequence_ids`` for packed rows), the teacher's task logits (fp32),
and, only when stage 1 runs, the teacher hidden states of the layer map (fp16, half the memory of fp32: stage 1's
loss then compares against the teacher's states rounded to fp16) and with ``--attention`` the mapped layers'
attention scores (fp16, dense [B, H, T, T]; brought to the student's per-sentence layout at each step).

**Where**: ``<teacher_cache>/<key>/``, the key a sha256 of what the content depends on (:class:`CacheSpec`: the
teacher's weights digest, the transfer corpus manifest's digest, the transfer order's seed, transfer batch, max length, packing, the
cached hidden-state indices, the attention flag, nb). Entries are written through a temporary file and a rename
and ``manifest.json`` last: a cache without its manifest is partial, and a later run computes only its missing
entries; a complete one is read without running the teacher. A complete cache of another key that holds
everything this run needs (the same teacher and data, more batches, more hidden states, or attention scores) is
read as well.

**Ranks**: rank 0 builds (a reader of world size 1 whose micro batch is the global batch: the project's reader
hands out micro-step ``j`` as positions/rows ``[j G, (j+1) G)`` split into consecutive slices per rank, so this
reader's batch ``j`` is the union of the ranks' batches ``j``, in rank order); the others wait; then every rank
reads every entry and keeps its rows ``[rank mb, (rank+1) mb)`` of each global batch. A resume on another number of
ranks therefore sees the same global batches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ds_kd.manifest import atomic_write_text

log = logging.getLogger("ds_kd")

CACHE_VERSION = 1
MANIFEST = "manifest.json"
INPUTS = ("input_ids", "attention_mask", "position_ids", "sequence_ids")
MEMORY_FRACTION = 0.25
"""The most of a machine's available memory the caches of its processes may take together."""
_EPOCH_ORDER = 17  # seed tag of the per-pass permutation


@dataclass(frozen=True)
class CacheSpec:
    """What a cache's content depends on; :attr:`key` names its folder."""

    teacher_sha256: str
    transfer_manifest_sha256: str
    seed: int
    transfer_batch: int
    max_len: int
    packing: bool
    hidden: tuple[int, ...]
    """Teacher hidden states cached (0 = embeddings, i = layer i), increasing; empty without stage 1."""
    attention: bool
    """Attention scores of the teacher layers ``hidden[1:]`` cached (stage 1 with ``--attention``)."""
    batches: int
    """nb: global batches cached."""

    @property
    def key(self) -> str:
        """sha256 (hex) of the fields and the cache format's version."""
        payload = json.dumps({"version": CACHE_VERSION, **asdict(self), "hidden": list(self.hidden)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def score_layers(self) -> tuple[int, ...]:
        """Indices into the teacher's attention scores (layer ``g`` is index ``g - 1``) cached."""
        return tuple(g - 1 for g in self.hidden[1:]) if self.attention else ()

    def serves(self, need: "CacheSpec") -> bool:
        """This cache holds everything ``need`` asks for: the same teacher, data and batching, at least its
        batches, hidden states and attention scores."""
        same = ("teacher_sha256", "transfer_manifest_sha256", "seed", "transfer_batch", "max_len", "packing")
        return (all(getattr(self, f) == getattr(need, f) for f in same) and self.batches >= need.batches
                and set(need.hidden) <= set(self.hidden) and set(need.score_layers) <= set(self.score_layers))

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "hidden" else v) for k, v in data.items() if k in names})


def num_batches(rows: int, transfer_batch: int) -> int:
    """nb = ceil(rows / transfer_batch): the global batches that hold ``rows`` rows."""
    return -(-rows // transfer_batch)


@lru_cache(maxsize=4)
def epoch_order(num: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The cached batches' order in pass ``epoch``: ``0 .. num-1`` in pass 0 (the online order), a permutation
    seeded by (seed, epoch) in every later pass."""
    if epoch == 0:
        return tuple(range(num))
    return tuple(int(i) for i in np.random.default_rng([seed, _EPOCH_ORDER, epoch]).permutation(num))


def batch_index(step: int, num: int, seed: int) -> int:
    """The cached global batch of transfer step ``step`` (from 0, over all transfer steps of the run)."""
    epoch, index = divmod(step, num)
    return epoch_order(num, seed, epoch)[index]


# -- size ----------------------------------------------------------------------------------------------------

def bytes_per_row(spec: CacheSpec, *, num_labels: int, per_token: bool, hidden_size: int,
                  num_heads: int) -> dict[str, int]:
    """Memory of one cached row by part, at most (rows of ``max_len`` tokens): the inputs (int64), the logits
    (fp32, per token or per row), the hidden states and attention scores (fp16)."""
    width = spec.max_len
    parts = {"inputs": (4 if spec.packing else 2) * width * 8,
             "logits": 4 * num_labels * (width if per_token else 1),
             "hidden states": 2 * len(spec.hidden) * width * hidden_size}
    if spec.attention:
        parts["attention scores"] = 2 * len(spec.score_layers) * num_heads * width * width
    return parts


def available_memory() -> int:
    """Bytes of memory available on this machine now (psutil, else /proc/meminfo's MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("/proc/meminfo has no MemAvailable line, and psutil is not installed")


def memory_refusal(spec: CacheSpec, per_row: dict[str, int], transfer_rows: int, world: int,
                   local_processes: int, available: int) -> str | None:
    """Why a cache of ``spec`` does not fit (every rank keeps its share of every global batch; the processes of
    one machine together hold ``local_processes / world`` of the cache), or None when it fits under
    :data:`MEMORY_FRACTION` of ``available`` bytes."""
    row = sum(per_row.values())
    total = row * spec.batches * spec.transfer_batch
    here = total * min(local_processes, world) / world
    limit = MEMORY_FRACTION * available
    if here <= limit:
        return None
    fit = int(limit * world / min(local_processes, world) // row) // spec.transfer_batch * spec.transfer_batch
    parts = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in per_row.items())
    return (f"--transfer-rows {transfer_rows}: the teacher-output cache would take about {here / 2**30:.2f} GiB of "
            f"this machine's memory ({spec.batches} global batches of {spec.transfer_batch} rows, "
            f"{row / 2**20:.2f} MiB per row: {parts}), over {MEMORY_FRACTION:.0%} of the {available / 2**30:.1f} GiB "
            f"available: lower --transfer-rows to at most {fit}, or run the teacher online (--transfer-rows 0)")


# -- building (rank 0) ----------------------------------------------------------------------------------------

def entry_path(directory: Path, index: int) -> Path:
    return directory / f"batch_{index:06d}.pt"


def complete(directory: Path) -> CacheSpec | None:
    """The spec of the complete cache in ``directory`` (its manifest written), or None."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text(encoding="utf-8"))
    if data.get("version") != CACHE_VERSION:
        return None
    return CacheSpec.from_dict(data["spec"])


def find_complete(root: Path, need: CacheSpec) -> Path | None:
    """A complete cache under ``root`` that serves ``need``: its own key's folder first, else any other."""
    if complete(root / need.key) is not None:
        return root / need.key
    if not root.is_dir():
        return None
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != need.key):
        spec = complete(folder)
        if spec is not None and spec.key == folder.name and spec.serves(need):
            return folder
    return None


def teacher_entry(teacher: torch.nn.Module, batch: dict, spec: CacheSpec, device: torch.device,
                  chunk: int) -> dict:
    """One global batch's cache entry: the inputs, the teacher's logits (fp32), its hidden states
    ``spec.hidden`` and attention scores (dense, fp16). The teacher runs on ``chunk`` rows at a time (the
    online run's micro batch: no more memory than online), every chunk at the global batch's width."""
    inputs = {k: batch[k].contiguous() for k in INPUTS if batch.get(k) is not None}
    rows, width = inputs["input_ids"].shape
    parts: list[dict] = []
    for start in range(0, rows, chunk):
        on_device = {k: v[start:start + chunk].to(device) for k, v in inputs.items()}
        with torch.no_grad():
            ref = teacher(**on_device, output_hidden_states=bool(spec.hidden),
                          output_attention_scores=bool(spec.score_layers))
        scores = {}
        for layer in spec.score_layers:
            layer_scores = ref.encoder.attention_scores[layer]
            dense = (layer_scores if isinstance(layer_scores, torch.Tensor)
                     else layer_scores.to_dense(len(on_device["input_ids"]), width))
            scores[layer] = dense.half().cpu()
        parts.append({"logits": {k: v.float().cpu() for k, v in ref.logits.items()},
                      "hidden": {g: ref.encoder.hidden_states[g].half().cpu() for g in spec.hidden},
                      "scores": scores})
    entry: dict[str, Any] = {"inputs": inputs}
    for part in ("logits", "hidden", "scores"):
        entry[part] = {k: torch.cat([p[part][k] for p in parts]) if len(parts) > 1 else parts[0][part][k]
                       for k in parts[0][part]}
    return entry


def build(directory: Path, spec: CacheSpec, teacher: torch.nn.Module, reader, device: torch.device,
          chunk: int) -> Iterator[int]:
    """Rank 0: write the entries of ``directory`` still missing, then its manifest; yields after each entry
    (the batch's index), so that the caller can keep the other ranks informed. ``reader``: a
    ``ShardReader`` of world size 1 whose micro batch is the global batch, at the stream's start; ``chunk``:
    rows per teacher forward pass."""
    directory.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(spec.batches) if not entry_path(directory, i).is_file()]
    if missing:
        log.info("[task-distill] teacher cache %s: the teacher labels %d of %d global batches%s", directory,
                 len(missing), spec.batches, "" if len(missing) == spec.batches else " (the rest were written by an "
                 "earlier, interrupted run)")
        todo, last = set(missing), missing[-1]
        started, done = time.time(), 0
        for index, batch in enumerate(reader):
            if index in todo:
                entry = teacher_entry(teacher, batch, spec, device, chunk)
                path = entry_path(directory, index)
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                torch.save(entry, tmp)
                os.replace(tmp, path)
                done += 1
                if done % max(1, len(missing) // 10) == 0 or done == len(missing):
                    log.info("[task-distill] teacher cache: %d/%d batches, %.0fs", done, len(missing),
                             time.time() - started)
                yield index
            if index == last:
                break
    manifest = {"version": CACHE_VERSION, "key": spec.key, "spec": asdict(spec),
                "rows": spec.batches * spec.transfer_batch, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: the cache is complete


# -- reading (every rank) -------------------------------------------------------------------------------------

def load(directory: Path, need: CacheSpec, rank: int, world: int) -> list[dict]:
    """Every rank: its rows ``[rank mb, (rank+1) mb)`` of each of the ``need.batches`` global batches of the
    complete cache in ``directory``, with only the hidden states and scores ``need`` asks for."""
    micro = need.transfer_batch // world
    rows = slice(rank * micro, (rank + 1) * micro)
    entries = []
    for index in range(need.batches):
        path = entry_path(directory, index)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: an entry of the teacher cache is missing although its manifest was "
                                    f"written: remove {directory} to build it again")
        saved = torch.load(path, map_location="cpu", weights_only=True)

        def mine(t: torch.Tensor) -> torch.Tensor:
            return t[rows].clone()  # a copy: the other ranks' rows are freed with the file's tensors

        entries.append({"inputs": {k: mine(v) for k, v in saved["inputs"].items()},
                        "logits": {k: mine(v) for k, v in saved["logits"].items()},
                        "hidden": {g: mine(saved["hidden"][g]) for g in need.hidden},
                        "scores": {layer: mine(saved["scores"][layer]) for layer in need.score_layers}})
    return entries


@dataclass
class TeacherOutputs:
    """The teacher's outputs on one batch as the transfer losses read them, online or from the cache:
    ``logits`` by head, ``hidden_states[g]`` (teacher state g, or None) and ``attention_scores[layer]``."""

    logits: dict[str, torch.Tensor]
    hidden_states: Any = None
    attention_scores: Any = None

    @classmethod
    def of_entry(cls, entry: dict, device: torch.device) -> "TeacherOutputs":
        """A cache entry's outputs on ``device``, hidden states and scores back in fp32."""
        def spread(parts: dict[int, torch.Tensor]) -> list | None:
            if not parts:
                return None
            out = [None] * (max(parts) + 1)
            for i, t in parts.items():
                out[i] = t.to(device).float()
            return out

        return cls({k: v.to(device) for k, v in entry["logits"].items()}, spread(entry["hidden"]),
                   spread(entry["scores"]))


def cache_bytes(entries: list[dict]) -> int:
    """Bytes this rank's cache entries take."""
    return sum(t.numel() * t.element_size() for e in entries for part in e.values() for t in part.values())


def pass_count(steps: int, num: int) -> float:
    """Passes over a cache of ``num`` batches that ``steps`` transfer steps make (4 decimals)."""
    return round(steps / num, 4) if num else math.nan
