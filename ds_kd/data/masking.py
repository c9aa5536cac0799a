"""Dynamic MLM masking (RoBERTa style) and padding of token-id sequences into a batch.

Masking runs per sample with its own random generator, seeded from (seed, epoch, sample id): the masks of a
sample do not depend on which rank, DataLoader worker or batch it lands in, so a resumed run reproduces them
exactly and validation perplexity is comparable across evaluations with any world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # label of positions that are not predicted (torch's cross-entropy default ignore_index)


@dataclass
class MaskingConfig:
    """How tokens are chosen and corrupted for the masked-language-model objective."""

    mlm_probability: float = 0.15
    """Probability that a non-special token is selected for prediction."""
    mask_fraction: float = 0.8
    """Of the selected tokens, the fraction replaced by [MASK]."""
    random_fraction: float = 0.1
    """Of the selected tokens, the fraction replaced by a random non-special token; the rest stay unchanged."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must lie in [0, 1], got {self.mlm_probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError(
                f"mask_fraction ({self.mask_fraction}) and random_fraction ({self.random_fraction}) must be "
                f"non-negative and sum to at most 1"
            )


class Masker:
    """Applies :class:`MaskingConfig` to one 1-D sequence of token ids. ``special_ids``: every special id of the
    tokenizer (:func:`ds_kd.data.shards.unmasked_ids`: roles and added special tokens such as language tags), never
    selected and never drawn as a random replacement."""

    def __init__(self, cfg: MaskingConfig, vocab_size: int, special_ids: Iterable[int], mask_id: int):
        self.cfg = cfg
        self.special_ids = np.array(sorted(set(int(i) for i in special_ids)), dtype=np.int64)
        self.is_special = np.zeros(max(vocab_size, int(self.special_ids.max()) + 1), dtype=bool)
        self.is_special[self.special_ids] = True
        self.mask_id = int(mask_id)
        # Random replacements are drawn from the vocabulary without special tokens: a random [CLS] or [PAD]
        # in the middle of a sentence would teach the model nothing useful.
        self.replacement_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.special_ids)
        if len(self.replacement_ids) == 0:
            raise ValueError(f"vocabulary of size {vocab_size} has no non-special token to sample from")

    def mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return (input ids, labels) for ``ids`` (all below the vocabulary size); labels are
        :data:`IGNORE_INDEX` where nothing is predicted."""
        ids = ids.astype(np.int64, copy=False)
        candidates = ~self.is_special[ids]
        selected = candidates & (rng.random(len(ids)) < self.cfg.mlm_probability)
        # A sample with nothing to predict contributes no loss; for short sentences (and tiny batches) that
        # can leave a whole batch without a masked position, so pick one when the draw picked none.
        if self.cfg.mlm_probability > 0 and not selected.any() and candidates.any():
            selected[rng.choice(np.flatnonzero(candidates))] = True
        labels = np.where(selected, ids, IGNORE_INDEX)
        action = rng.random(len(ids))
        to_mask = selected & (action < self.cfg.mask_fraction)
        to_random = selected & (action >= self.cfg.mask_fraction) & (
            action < self.cfg.mask_fraction + self.cfg.random_fraction)
        inputs = ids.copy()
        inputs[to_mask] = self.mask_id
        num_random = int(to_random.sum())
        if num_random:
            inputs[to_random] = self.replacement_ids[rng.integers(0, len(self.replacement_ids), num_random)]
        return inputs, labels


def pad_batch(inputs: Sequence[np.ndarray], labels: Sequence[np.ndarray], lang_ids: Sequence[int],
              pad_id: int) -> dict[str, torch.Tensor]:
    """Stack sequences into tensors padded to the longest in the batch (never to a fixed length)."""
    num_rows, length = len(inputs), max(len(x) for x in inputs)
    input_ids = np.full((num_rows, length), pad_id, dtype=np.int64)
    label_ids = np.full((num_rows, length), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((num_rows, length), dtype=np.int64)
    for row, (x, y) in enumerate(zip(inputs, labels)):
        input_ids[row, : len(x)] = x
        label_ids[row, : len(y)] = y
        attention[row, : len(x)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(label_ids),
        "lang_ids": torch.tensor(list(lang_ids), dtype=torch.long),
    }
