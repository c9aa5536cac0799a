"""The packed training and validation stream: rows of whole sentences, one global order, split at read time.

The sentence order is :class:`ds_kd.data.order.SentenceOrder`'s. Each of its windows (``shuffle_window`` blocks of
one epoch, whose sentences are permuted together) is packed on its own: its sentences, cut to ``max_len``, go
into rows of ``max_len`` tokens by best-fit decreasing (:func:`ds_kd.data.packing.best_fit`), and the rows are
permuted (seeded by (seed, epoch, window)) so that a batch does not hold only long or only short sentences. The
rows of all windows, epoch after epoch, form the **row stream**, a pure function of the seed: micro-step ``j``
of the job is rows ``[j S, (j+1) S)`` with ``S = world_size x micro_batch_size`` rows, and rank ``r`` takes the
``r``-th slice of ``micro_batch_size`` rows. Validation packs the blocks in order, windows of
``shuffle_window`` blocks, rows unpermuted; every sentence is in exactly one row.

A window's rows depend on that window's sentences alone, so the position ``(rows consumed, and the window
holding the next row with the row it starts at)`` names exactly which sentences were seen: resuming re-packs
that window and continues with its next row, on any number of ranks and workers. Nothing is drained or
buffered across a checkpoint, and no sentence is seen twice or skipped (a counter of rows alone, with rows
made from a buffer whose content depends on where a run started, would not have this property).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ds_kd.data.packing import best_fit, packed_batch
from ds_kd.data.order import RNG_DROPOUT, StreamPlan

_ROW_ORDER = 5


@dataclass(frozen=True)
class Locator:
    """A window of the row stream: (epoch, window index in the epoch, index of its first row in the stream)."""

    epoch: int = 0
    window: int = 0
    first_row: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.window, self.first_row]


class PackedStreamPlan(StreamPlan):
    """A :class:`ds_kd.data.order.StreamPlan` whose micro-batches are ``micro_batch_size`` packed rows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.locator = Locator()
        self._rows: OrderedDict = OrderedDict()

    # ---- windows -------------------------------------------------------------------------------------

    def bounds(self, epoch: int) -> np.ndarray:
        """Window bounds of an epoch, in positions within it [num_windows + 1]."""
        if self.shuffle:
            return self.order.layout(epoch)[1]
        sizes = self.table.num_sentences
        ends = np.cumsum(sizes)[self.shuffle_window - 1::self.shuffle_window]
        return np.unique(np.concatenate([[0], ends, [self.order.num_sentences]]))

    def window_rows(self, epoch: int, window: int) -> list[np.ndarray]:
        """The rows of a window: each an array of stream positions, in the row's order."""
        key = (epoch, window)
        if key not in self._rows:
            bounds = self.bounds(epoch)
            positions = epoch * self.order.num_sentences + np.arange(bounds[window], bounds[window + 1])
            _, ids = self.order.lookup(positions)
            lengths = np.minimum(self.lengths(ids), self.max_len)
            rows = [positions[np.asarray(row)] for row in best_fit(lengths.tolist(), self.max_len)]
            if self.shuffle:
                order = np.random.default_rng([self.seed, _ROW_ORDER, epoch, window]).permutation(len(rows))
                rows = [rows[i] for i in order]
            self._rows[key] = rows
            while len(self._rows) > 2:
                self._rows.popitem(last=False)
        return self._rows[key]

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        """Token counts of the sentences ``ids`` [n] (from the blocks' offsets)."""
        blocks = self.table.block_of(ids)
        out = np.empty(len(ids), dtype=np.int64)
        for b in np.unique(blocks):
            here = blocks == b
            offsets = self.block(int(b)).offsets.astype(np.int64)
            local = ids[here] - int(self.table.first_sentence[b])
            out[here] = offsets[local + 1] - offsets[local]
        return out

    def next_window(self, at: Locator) -> Locator | None:
        """The window after ``at``, or None past the end of a finite stream."""
        num_rows = len(self.window_rows(at.epoch, at.window))
        if at.window + 1 < len(self.bounds(at.epoch)) - 1:
            return Locator(at.epoch, at.window + 1, at.first_row + num_rows)
        if self.epochs is not None and at.epoch + 1 >= self.epochs:
            return None
        return Locator(at.epoch + 1, 0, at.first_row + num_rows)

    def rows(self, first: int, count: int) -> list[np.ndarray]:
        """Rows ``first .. first + count - 1`` of the stream (fewer at the end of a finite stream), moving this
        plan's locator forward; ``first`` must not lie before the locator's window."""
        if first < self.locator.first_row:
            raise RuntimeError(f"row {first} lies before the reader's window starting at row "
                               f"{self.locator.first_row}: the stream only moves forward")
        out: list[np.ndarray] = []
        at: Locator | None = self.locator
        while at is not None and len(out) < count:
            rows = self.window_rows(at.epoch, at.window)
            if first + len(out) < at.first_row + len(rows):
                self.locator = at
                start = first + len(out) - at.first_row
                out.extend(rows[start:start + count - len(out)])
                if len(out) == count:
                    break
            at = self.next_window(at)
        return out

    # ---- batches ------------------------------------------------------------------------------------

    @property
    def step_size(self) -> int:
        """Rows of one micro-step of the whole job (all ranks)."""
        return self.world_size * self.micro_batch_size

    def batch(self, step: int) -> dict | None:
        """This rank's packed rows of micro-step ``step``, or None past the end of the stream."""
        first_row = step * self.step_size + self.rank * self.micro_batch_size
        rows = self.rows(first_row, self.micro_batch_size)
        if not rows:
            return None
        positions = np.concatenate(rows)
        sentences, labels = self.sentences(positions)
        index, layout = 0, []
        for row in rows:
            layout.append(list(range(index, index + len(row))))
            index += len(row)
        batch = packed_batch([x for _, x, _ in sentences], labels, [lang for _, _, lang in sentences], layout,
                             self.special["pad"])
        batch["sentence_ids"] = torch.tensor([sid for sid, _, _ in sentences], dtype=torch.long)
        batch["stream_positions"] = torch.from_numpy(positions)
        batch["window"] = torch.tensor(self.locator.as_list())
        seed = np.random.SeedSequence([self.seed, RNG_DROPOUT, first_row]).generate_state(1, np.uint32)
        batch["dropout_seed"] = int(seed[0])
        return self.finish(batch)

    def rows_per_sentence(self) -> float:
        """Rows per sentence in the first window: how a budget in epochs converts to packed steps."""
        rows = self.window_rows(0, 0)
        return len(rows) / max(1, sum(len(r) for r in rows))
