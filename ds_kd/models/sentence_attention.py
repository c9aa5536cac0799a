"""Attention of packed rows computed per sentence: the sentences of a batch regrouped into buckets of similar length.

A packed row of T tokens holding several sentences needs only block-diagonal attention. Computing it as one T x T
product with the cross-sentence pairs masked spends ``T`` scores on every token whatever its sentence's length
(128 per token at ``--max-len 128`` for sentences of 17 tokens on average), and the softmax, dropout and their
backward pay for all of them. Here the encoder's linear layers still run on the packed rows (no padding), and only
the attention product regroups the tokens: each sentence becomes one row of a bucket of sentences of similar
length (lengths rounded up to a power of two, at least :data:`MIN_WIDTH`, each bucket padded to its longest
sentence), and ``scaled_dot_product_attention`` runs per bucket with a key-padding mask. A token then gets about
as many scores as its sentence has tokens (at most twice as many, or :data:`MIN_WIDTH` for a sentence shorter
than half of it), and the result is the same function as the masked product: every sentence attends only to
itself (the project's tests compare values and gradients of both).

The idea of variable-length attention kernels (FlashAttention's ``varlen``), built from the standard SDPA so that
it runs, and is tested, on CPU; measured with ``benchmarks/bench_packing.py``. The layout is built on the host from
the sequence ids; training builds it in the DataLoader worker (:func:`ds_kd.train.loop.host_layout`), where the ids
already are, so the device is never waited for (built from device ids it costs one device-to-host copy). The
bucket shapes change from batch to batch (no CUDA graphs or static-shape compilation); a fused varlen kernel would
also avoid the gather and scatter. Neither that kernel nor this path on CUDA has been run by the project's tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MIN_WIDTH = 16
"""Narrowest bucket: shorter sentences share one bucket (fewer, larger products)."""


@dataclass(frozen=True)
class SentenceBuckets:
    """Where each token of a packed batch sits in the per-sentence attention layout.

    - ``gather`` [S] long: for each of the S slots of all buckets (bucket by bucket, sentence by sentence,
      position by position), the flat index (``row * T + t``) of its token; padding slots hold any valid index
      (their keys are masked and their outputs never read back).
    - ``scatter`` [B * T] long: the slot of each token of the rows; padding tokens of the rows point at slot 0
      (their outputs are never used, as with the masked product).
    - ``shapes``: (sentences, width) of each bucket, in slot order.
    - ``key_masks``: per bucket a [sentences, 1, 1, width] bool mask (True = a real key), or None where the
      bucket has no padding.
    """

    gather: torch.Tensor
    scatter: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    key_masks: tuple[torch.Tensor | None, ...]

    @classmethod
    def build(cls, sequence_ids_BT: torch.Tensor) -> "SentenceBuckets":
        """The layout of ``sequence_ids_BT`` [B, T] (0 at padding, equal positive ids for the tokens of one
        sentence of a row), on the ids' device. Computed on the host: ids on a GPU are copied back first, which
        makes the host wait for the device (build it from host ids and move it with :meth:`to`).

        Raises ValueError when the batch holds no real token."""
        rows, width = sequence_ids_BT.shape
        ids = sequence_ids_BT.detach().cpu().numpy().reshape(-1)
        tokens = np.flatnonzero(ids > 0)
        if tokens.size == 0:
            raise ValueError("a packed batch without any real token (every sequence id is 0)")
        key = (tokens // width) * (int(ids.max()) + 1) + ids[tokens]  # one key per (row, sentence)
        order = np.argsort(key, kind="stable")  # sentence by sentence, positions in row order
        tokens, key = tokens[order], key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        lengths = np.diff(np.r_[starts, key.size])
        position = np.arange(key.size) - np.repeat(starts, lengths)
        widths = np.maximum(MIN_WIDTH, 1 << np.ceil(np.log2(lengths)).astype(np.int64))
        base = np.empty(lengths.size, np.int64)
        shapes, offset = [], 0
        for w in np.unique(widths):
            members = np.flatnonzero(widths == w)
            longest = int(lengths[members].max())
            base[members] = offset + np.arange(members.size) * longest
            shapes.append((int(members.size), longest))
            offset += members.size * longest
        slot = np.repeat(base, lengths) + position
        gather = np.full(offset, tokens[0], np.int64)
        gather[slot] = tokens
        real = np.zeros(offset, bool)
        real[slot] = True
        scatter = np.zeros(rows * width, np.int64)
        scatter[tokens] = slot
        device = sequence_ids_BT.device
        masks, start = [], 0
        for n, w in shapes:
            keep = real[start:start + n * w]
            masks.append(None if keep.all() else torch.from_numpy(keep.reshape(n, 1, 1, w)).to(device))
            start += n * w
        return cls(torch.from_numpy(gather).to(device), torch.from_numpy(scatter).to(device), tuple(shapes),
                   tuple(masks))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SentenceBuckets":
        """The same layout with its tensors on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SentenceBuckets":
        """The same layout in page-locked host memory (a DataLoader with ``pin_memory`` calls this)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> "SentenceBuckets":
        return SentenceBuckets(fn(self.gather), fn(self.scatter), self.shapes,
                               tuple(None if m is None else fn(m) for m in self.key_masks))

    def keeps(self) -> list[torch.Tensor]:
        """Per bucket, [sentences, width] bool: which slots hold a real token."""
        return [torch.ones(n, w, dtype=torch.bool, device=self.gather.device) if mask is None else mask.view(n, w)
                for (n, w), mask in zip(self.shapes, self.key_masks)]

    def attend(self, q_BTD: torch.Tensor, k_BTD: torch.Tensor, v_BTD: torch.Tensor, num_heads: int,
               dropout_p: float, want_scores: bool = False) -> tuple[torch.Tensor, "SentenceScores | None"]:
        """Per-sentence attention of the projected queries, keys and values [B, T, D] -> (context [B, T, D],
        the pre-softmax scores as :class:`SentenceScores` when ``want_scores``, else None). Without scores each
        bucket goes through ``scaled_dot_product_attention`` (dropout on the probabilities as SDPA applies it);
        with them, through the explicit product, softmax and dropout (what distillation's attention loss needs)."""
        b, t, d = q_BTD.shape
        head_dim = d // num_heads
        q, k, v = (x.reshape(b * t, d).index_select(0, self.gather) for x in (q_BTD, k_BTD, v_BTD))
        out, scores, start = [], [], 0
        for (n, w), mask in zip(self.shapes, self.key_masks):
            def heads(x: torch.Tensor) -> torch.Tensor:
                return x[start:start + n * w].view(n, w, num_heads, head_dim).transpose(1, 2)  # [n, H, w, Dh]

            if want_scores:
                scores_nHww = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(head_dim)
                logits = scores_nHww if mask is None else mask_scores(scores_nHww, mask)
                ctx = F.dropout(torch.softmax(logits, dim=-1), dropout_p, dropout_p > 0) @ heads(v)
                scores.append(scores_nHww)
            else:
                ctx = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                                     dropout_p=dropout_p)
            out.append(ctx.transpose(1, 2).reshape(n * w, d))
            start += n * w
        context = torch.cat(out).index_select(0, self.scatter).view(b, t, d)
        return context, (SentenceScores(self, tuple(scores)) if want_scores else None)


def mask_scores(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``scores`` with the pairs ``keep`` (broadcastable bool) rules out set to the dtype's minimum, the logits of
    a softmax that gives them no weight. Filled, not added: a bias added to the scores overflows to -inf in
    fp16, and a row of -inf turns into NaN under softmax."""
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)


@dataclass(frozen=True)
class SentenceScores:
    """One layer's pre-softmax attention scores of packed rows, in the per-sentence layout of ``buckets``:
    ``scores`` holds per bucket a [sentences, H, width, width] tensor (query by key within one sentence; slots
    past a sentence's end hold values of no meaning, :meth:`SentenceBuckets.keeps` says which are real)."""

    buckets: SentenceBuckets
    scores: tuple[torch.Tensor, ...]

    @property
    def num_heads(self) -> int:
        return self.scores[0].shape[1]

    def map(self, fn) -> "SentenceScores":
        """The same layout with ``fn`` applied to every bucket's scores (e.g. a mean over heads)."""
        return SentenceScores(self.buckets, tuple(fn(x) for x in self.scores))

    def to_dense(self, rows: int, width: int) -> torch.Tensor:
        """The scores as [B, H, T, T] for rows of ``width`` tokens: each sentence's block where the masked
        product puts it, 0 for pairs across sentences and at padding (for inspection and tests)."""
        heads = self.num_heads
        dense = self.scores[0].new_zeros(rows * width * width, heads)
        start = 0
        for scores_nHww, keep in zip(self.scores, self.buckets.keeps()):
            n, w = keep.shape
            tokens = self.buckets.gather[start:start + n * w].view(n, w)
            row, t = tokens // width, tokens % width
            where = row[:, :, None] * width * width + t[:, :, None] * width + t[:, None, :]  # [n, w, w]
            pairs = keep[:, :, None] & keep[:, None, :]
            dense[where[pairs]] = scores_nHww.permute(0, 2, 3, 1)[pairs]
            start += n * w
        return dense.view(rows, width, width, heads).permute(0, 3, 1, 2)

    @classmethod
    def from_dense(cls, dense_BHTT: torch.Tensor, buckets: SentenceBuckets) -> "SentenceScores":
        """The scores of ``dense_BHTT`` [B, H, T, T] (a sentence's pairs where :meth:`to_dense` puts them) in the
        per-sentence layout of ``buckets`` (built from sequence ids of the same [B, T]): the inverse of
        :meth:`to_dense` on a sentence's real pairs; padding slots take values of no meaning. Distillation uses it
        for teacher scores stored densely (a cache sliced by rows) against a student's per-sentence scores."""
        rows, heads, width, _ = dense_BHTT.shape
        flat = dense_BHTT.permute(0, 2, 3, 1).reshape(rows * width * width, heads)
        scores, start = [], 0
        for n, w in buckets.shapes:
            tokens = buckets.gather[start:start + n * w].view(n, w)
            row, t = tokens // width, tokens % width
            where = row[:, :, None] * width * width + t[:, :, None] * width + t[:, None, :]  # [n, w, w]
            scores.append(flat[where].permute(0, 3, 1, 2))  # [n, w, w, H] -> [n, H, w, w]
            start += n * w
        return cls(buckets, tuple(scores))
