"""A language-balanced order of a split's sentences: equal counts per language in every epoch, in monolingual runs.

BiStil (Ansell et al., 2023; AlanAnsell/bistil, ``MultiSourceDataset(truncate=True)``) distils a bilingual
student on its two languages in equal parts, whatever the sizes of their corpora, and every batch is
monolingual. :class:`BalancedOrder` is that order as a drop-in for :class:`ds_kd.data.order.SentenceOrder`:

- each epoch takes ``per_lang`` sentences of every language, the smallest language's count rounded down to a
  multiple of ``run``; a larger language gives a fresh random subset in each epoch (seeded by (seed, epoch,
  language)), so over epochs all of its text is seen;
- the epoch is cut into runs of ``run`` consecutive positions (the global batch), run ``k`` from language
  ``k mod L``: each optimizer step reads one language, the languages take turns;
- the sentence at a position is a pure function of (seed, epoch, position, run), like the plain order, so the
  reader's state stays one number and a resume with the same global batch is exact on any topology.

Where BiStil's dataset repeats epochs in one order, each epoch here draws its own permutations, as the plain
order reshuffles every epoch. One sentence per row: packed rows (which cross batch boundaries) are refused.
"""
from __future__ import annotations

import numpy as np

from ds_kd.errors import UsageError

RNG_LANG_ORDER = 5
"""The random stream of the per-language permutations (beside ``ds_kd.data.order``'s streams 1-4)."""


class BalancedOrder:
    """Sentence ids of a stream with equal sentences per language per epoch, monolingual runs of ``run``.

    ``langs_N`` is the language id of every sentence of the split (its sentence id is the index). Raises
    UsageError when a language has fewer than ``run`` sentences (no whole run of it fits in an epoch) or the
    split holds a single language (nothing to balance)."""

    def __init__(self, langs_N: np.ndarray, seed: int, run: int, lang_codes: tuple[str, ...]):
        langs_N = np.asarray(langs_N)
        self.langs = [int(l) for l in np.unique(langs_N)]
        self.lang_codes = lang_codes
        named = [lang_codes[l] for l in self.langs]
        if len(self.langs) < 2:
            raise UsageError(f"--lang-mix balanced: the training split holds one language ({', '.join(named)}); "
                             f"build the corpus with the pair's languages (python -m data_prep corpus --langs ...)")
        self.ids = [np.flatnonzero(langs_N == l) for l in self.langs]
        smallest = min(len(ids) for ids in self.ids)
        self.seed, self.run = seed, run
        self.per_lang = smallest // run * run
        if self.per_lang == 0:
            raise UsageError(f"--lang-mix balanced: {named[int(np.argmin([len(i) for i in self.ids]))]} has "
                             f"{smallest} training sentences, fewer than one global batch ({run}): use a smaller "
                             f"batch or more text")
        self.num_sentences = self.per_lang * len(self.langs)
        self._epoch: tuple[int, list[np.ndarray]] | None = None

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, sentence id) of each stream position [n]."""
        epochs, within = np.divmod(np.asarray(positions, dtype=np.int64), self.num_sentences)
        runs, offset = np.divmod(within, self.run)
        lang_index, turn = runs % len(self.langs), runs // len(self.langs)
        slot = turn * self.run + offset
        ids = np.empty_like(within)
        for epoch in np.unique(epochs):
            chosen = self.chosen(int(epoch))
            for i, part in enumerate(chosen):
                at = (epochs == epoch) & (lang_index == i)
                ids[at] = part[slot[at]]
        return epochs, ids

    def chosen(self, epoch: int) -> list[np.ndarray]:
        """Per language (in :attr:`langs` order), the epoch's ``per_lang`` sentence ids in stream order."""
        if self._epoch is None or self._epoch[0] != epoch:
            parts = [ids[np.random.default_rng([self.seed, RNG_LANG_ORDER, epoch, lang]).permutation(len(ids))
                         [:self.per_lang]] for lang, ids in zip(self.langs, self.ids)]
            self._epoch = (epoch, parts)
        return self._epoch[1]

    def counts(self, consumed: int) -> dict[str, int]:
        """Sentences of each language (by code) among the first ``consumed`` positions of the stream."""
        epochs, within = divmod(int(consumed), self.num_sentences)
        runs, offset = divmod(within, self.run)
        out = {}
        for i, lang in enumerate(self.langs):
            in_epoch = (runs // len(self.langs)) * self.run + (self.run if i < runs % len(self.langs) else 0)
            if i == runs % len(self.langs):
                in_epoch += offset
            out[self.lang_codes[lang]] = epochs * self.per_lang + in_epoch
        return out
