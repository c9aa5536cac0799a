"""The global order of a split's sentences and the plan of one rank's stream of micro-batches (see
:mod:`ds_kd.data.reader` for the order's definition and the split across ranks and workers).

Its own module so that the reader and the packed stream (:mod:`ds_kd.data.packed_stream`, a :class:`StreamPlan` that
fills rows) both import it and not each other.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ds_kd.data.lang_mix import BalancedOrder
from ds_kd.data.masking import Masker, pad_batch
from ds_kd.data.shards import Block, BlockTable

# Separate random streams for the uses of the seed.
RNG_BLOCK_ORDER, RNG_WINDOW_ORDER, RNG_MASKS, RNG_DROPOUT = 1, 2, 3, 4


# ---- the order --------------------------------------------------------------------------------------

class SentenceOrder:
    """The sentence id at each position of the stream: a pure function of (seed, epoch, position).

    Shuffled: per epoch a permutation of the blocks (seed, epoch), cut into windows of ``window`` blocks whose
    sentences are permuted together (seed, epoch, window). Unshuffled: position = sentence id. Keeps the
    layout of the last epoch and the last two windows it was asked about."""

    def __init__(self, block_sizes: np.ndarray, seed: int, shuffle: bool, window: int):
        self.block_sizes, self.seed, self.shuffle, self.window = block_sizes, seed, shuffle, window
        self.first = np.concatenate([[0], np.cumsum(block_sizes)]).astype(np.int64)
        self.num_sentences = int(self.first[-1])
        self._epoch: tuple | None = None
        self._windows: OrderedDict = OrderedDict()

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, sentence id) of each stream position [n]."""
        epochs, within = np.divmod(np.asarray(positions, dtype=np.int64), self.num_sentences)
        if not self.shuffle:
            return epochs, within
        ids = np.empty_like(within)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            blocks, bounds = self.layout(int(epoch))
            windows = np.searchsorted(bounds, within[here], side="right") - 1
            part = np.empty(int(here.sum()), dtype=np.int64)
            for w in np.unique(windows):
                at = windows == w
                part[at] = self._window(int(epoch), int(w), blocks, bounds)[within[here][at] - bounds[w]]
            ids[here] = part
        return epochs, ids

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's block order [num_blocks] and window bounds in positions [num_windows + 1]."""
        if self._epoch is None or self._epoch[0] != epoch:
            blocks = np.random.default_rng([self.seed, RNG_BLOCK_ORDER, epoch]).permutation(len(self.block_sizes))
            sizes = self.block_sizes[blocks]
            ends = np.cumsum(sizes)[self.window - 1::self.window]
            bounds = np.unique(np.concatenate([[0], ends, [self.num_sentences]]))
            self._epoch = (epoch, blocks, bounds)
        return self._epoch[1], self._epoch[2]

    def _window(self, epoch: int, w: int, blocks: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """Sentence ids of window ``w`` of ``epoch``, in stream order."""
        key = (epoch, w)
        if key not in self._windows:
            members = blocks[w * self.window:(w + 1) * self.window]
            ids = np.concatenate([np.arange(self.first[b], self.first[b + 1]) for b in members])
            rng = np.random.default_rng([self.seed, RNG_WINDOW_ORDER, epoch, w])
            self._windows[key] = ids[rng.permutation(len(ids))]
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        return self._windows[key]


# ---- the stream of one rank ----------------------------------------------------------------------------

Sentence = tuple[int, np.ndarray, int]
"""(sentence id, token ids [n], language id) after masking: see :meth:`StreamPlan.sentences`."""


@dataclass
class StreamPlan:
    """Everything a worker needs to produce its rank's micro-batches: the blocks, the order, the slicing."""

    table: BlockTable
    rank: int
    world_size: int
    micro_batch_size: int
    seed: int
    shuffle: bool
    shuffle_window: int
    epochs: int | None
    fixed_masks: bool
    max_len: int
    special: dict
    masker: Masker
    collate: Callable[[list[Sentence], list[np.ndarray]], dict] | None = None
    """Turns the masked sentences (with their labels) into a batch; None: pad to the longest (MLM)."""
    prepare: Callable[[dict], dict] | None = None
    """Applied to every finished batch in the worker: host-side work for the consumer (training passes
    :func:`ds_kd.train.loop.host_layout`)."""
    lang_run: int | None = None
    """Balance the languages (:class:`ds_kd.data.lang_mix.BalancedOrder`) in monolingual runs of this many
    positions (the global batch); None: the corpus's own mix (:class:`SentenceOrder`)."""
    lang_codes: tuple[str, ...] = ()
    """The corpus's language codes (a block's language ids index them): what a balanced order counts by."""

    def __post_init__(self) -> None:
        if self.lang_run:
            langs_N = np.concatenate([self.table.read(b).langs for b in range(self.table.num_blocks)])
            self.order = BalancedOrder(langs_N, self.seed, self.lang_run, self.lang_codes)
        else:
            self.order = SentenceOrder(self.table.num_sentences, self.seed, self.shuffle, self.shuffle_window)
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = 2 * self.shuffle_window + 2

    @property
    def step_size(self) -> int:
        """Sentences of one micro-step of the whole job (all ranks)."""
        return self.world_size * self.micro_batch_size

    @property
    def stream_length(self) -> float:
        return float("inf") if self.epochs is None else self.epochs * self.order.num_sentences

    def positions(self, step: int) -> np.ndarray:
        """This rank's stream positions in micro-step ``step`` (fewer, or none, at the end of a finite stream)."""
        first = step * self.step_size + self.rank * self.micro_batch_size
        last = min(first + self.micro_batch_size, self.stream_length)
        return np.arange(first, max(first, last), dtype=np.int64)

    def block(self, index: int) -> Block:
        if index not in self._cache:
            self._cache[index] = self.table.read(index)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[index]

    def sentences(self, positions: np.ndarray) -> tuple[list[Sentence], list[np.ndarray]]:
        """The masked sentences at ``positions``: ([(sentence id, input ids, language id)], [labels])."""
        epochs, ids = self.order.lookup(positions)
        blocks = self.table.block_of(ids)
        out, labels = [], []
        for epoch, sid, b in zip(epochs.tolist(), ids.tolist(), blocks.tolist()):
            arrays = self.block(b)
            i = sid - int(self.table.first_sentence[b])
            tokens = arrays.tokens[arrays.offsets[i]:arrays.offsets[i + 1]]
            if len(tokens) > self.max_len:
                tokens = np.concatenate([tokens[: self.max_len - 1], [self.special["sep"]]])
            mask_epoch = 0 if self.fixed_masks else epoch
            x, y = self.masker.mask(tokens, np.random.default_rng([self.seed, RNG_MASKS, mask_epoch, sid]))
            out.append((sid, x, int(arrays.langs[i])))
            labels.append(y)
        return out, labels

    def batch(self, step: int) -> dict | None:
        """This rank's batch of micro-step ``step``, or None past the end of the stream."""
        positions = self.positions(step)
        if not len(positions):
            return None
        sentences, labels = self.sentences(positions)
        if self.collate is not None:
            batch = self.collate(sentences, labels)
        else:
            batch = pad_batch([x for _, x, _ in sentences], labels, [lang for _, _, lang in sentences],
                              self.special["pad"])
        batch["sentence_ids"] = torch.tensor([sid for sid, _, _ in sentences], dtype=torch.long)
        seed = np.random.SeedSequence([self.seed, RNG_DROPOUT, int(positions[0])]).generate_state(1, np.uint32)
        batch["dropout_seed"] = int(seed[0])
        return self.finish(batch)

    def finish(self, batch: dict) -> dict:
        """``batch`` after :attr:`prepare`."""
        return batch if self.prepare is None else self.prepare(batch)
