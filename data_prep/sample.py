"""Step 2 of the corpus: the language mix (XLM multinomial with upsampling) and the validation hold-out.

With n_i sentences read in language i, p_i = n_i / sum_j n_j and q_i = p_i^alpha / sum_j p_j^alpha. The
training mix holds round(N * q_i) sentences of language i (largest-remainder rounding, so the counts sum
to exactly N): every training sentence of the language repeated floor(s_i / n_train_i) times plus a
uniform random subset for the remainder. This is the expectation of the multinomial draw, without its noise.

Validation sentences are drawn per language first; a training line whose text equals a validation
sentence of any language is dropped too (help texts and Wikipedia repeat lines, and help corpora share UI
strings, code and names across languages), so no validation text is ever trained on.

Memory stays bounded: each language file is streamed twice (choose validation, then sample) and the
selections use sequential selection sampling (no index arrays). The shuffle writes every training copy to
one of K bucket files chosen uniformly at random, then loads, shuffles and appends one bucket at a time;
K is set so that a bucket holds about ``bucket_mb`` MiB of text, which bounds the memory of this step to
roughly 3x that (Python string overhead). The concatenation of shuffled random buckets is a uniformly
random permutation of the mix.
"""
from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from ds_kd.errors import UsageError

TRAIN_FILE = "train.tsv"
VAL_FILE = "val.tsv"


@dataclass(frozen=True)
class SampleConfig:
    """How the training mix and the validation hold-out are drawn."""

    alpha: float = 0.5
    """Exponent of the multinomial: 1 keeps the natural proportions, 0 gives every language the same share."""
    total: int | None = None
    """Sentences in the training mix; None: as many as the training sentences read (the mix reweighted)."""
    seed: int = 0
    """Seed of every random choice of this step; the same seed gives the same files."""
    val_per_lang: int = 1000
    """Validation sentences held out per language (at most 10% of the language's sentences)."""
    bucket_mb: float = 256
    """Target size of one shuffle bucket in MiB; bounds the memory of the shuffle."""


def mix_probabilities(counts: dict[str, int], alpha: float) -> dict[str, float]:
    """q_i = p_i^alpha / sum_j p_j^alpha with p_i = n_i / sum_j n_j (XLM, Conneau & Lample 2019)."""
    total = sum(counts.values())
    if total <= 0:
        raise UsageError(f"no sentences to mix: {counts}")
    weights = {lang: (n / total) ** alpha if n > 0 else 0.0 for lang, n in counts.items()}
    norm = sum(weights.values())
    return {lang: w / norm for lang, w in weights.items()}


def allocate(total: int, probs: dict[str, float]) -> dict[str, int]:
    """Split ``total`` into integer counts proportional to ``probs`` (largest remainder, sums to total)."""
    exact = {lang: total * q for lang, q in probs.items()}
    counts = {lang: math.floor(x) for lang, x in exact.items()}
    left = total - sum(counts.values())
    by_remainder = sorted(exact, key=lambda lang: (-(exact[lang] - counts[lang]), lang))
    for lang in by_remainder[:left]:
        counts[lang] += 1
    return counts


def select_flags(num_items: int, num_chosen: int, rng: random.Random) -> Iterator[bool]:
    """Sequential selection sampling (Knuth's algorithm S): exactly ``num_chosen`` of ``num_items``, O(1) memory."""
    needed = num_chosen
    for seen in range(num_items):
        pick = needed > 0 and rng.random() * (num_items - seen) < needed
        needed -= pick
        yield pick


def num_val_for(num_sentences: int, val_per_lang: int) -> int:
    return min(val_per_lang, num_sentences // 10)


def read_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def hold_out_val(path: Path, num_sentences: int, num_val: int, rng: random.Random) -> list[str]:
    flags = select_flags(num_sentences, num_val, rng)
    return [line for line, pick in zip(read_lines(path), flags) if pick]


def count_train(path: Path, val_texts: set[str], val_flags: Iterator[bool]) -> int:
    return sum(1 for line, is_val in zip(read_lines(path), val_flags) if not is_val and line not in val_texts)


def iter_train(path: Path, val_texts: set[str], val_flags: Iterator[bool]) -> Iterator[str]:
    for line, is_val in zip(read_lines(path), val_flags):
        if not is_val and line not in val_texts:
            yield line


@dataclass
class LangPlan:
    """What the mix takes from one language."""

    num_read: int
    num_val: int
    num_train_available: int
    p: float
    q: float
    num_sampled: int


def seeded(seed: int, *parts: str) -> random.Random:
    """One independent, reproducible random stream per purpose (string seeds hash stably across runs)."""
    return random.Random("-".join([str(seed), *parts]))


def write_mix(read_dir: Path, read_counts: dict[str, dict], out_dir: Path, config: SampleConfig) -> dict:
    """Write ``train.tsv`` (shuffled mix) and ``val.tsv`` (``lang<TAB>sentence``) and return the plan."""
    langs = list(read_counts)
    out_dir.mkdir(parents=True, exist_ok=True)
    held_out: set[str] = set()  # every language's validation texts: lines are shared across languages
    num_val: dict[str, int] = {}
    with open(out_dir / f".{VAL_FILE}.tmp", "w", encoding="utf-8") as val_out:
        for lang in langs:
            n = read_counts[lang]["num_sentences"]
            val = hold_out_val(read_dir / f"{lang}.txt", n, num_val_for(n, config.val_per_lang),
                               seeded(config.seed, lang, "val"))
            val_out.writelines(f"{lang}\t{s}\n" for s in val)
            held_out.update(val)
            num_val[lang] = len(val)
    plans: dict[str, LangPlan] = {}
    for lang in langs:
        n = read_counts[lang]["num_sentences"]
        flags = select_flags(n, num_val[lang], seeded(config.seed, lang, "val"))
        available = count_train(read_dir / f"{lang}.txt", held_out, flags)
        plans[lang] = LangPlan(n, num_val[lang], available, 0.0, 0.0, 0)
    counts = {lang: plan.num_read for lang, plan in plans.items()}
    q = mix_probabilities(counts, config.alpha)
    p = mix_probabilities(counts, 1.0)
    total = config.total if config.total is not None else sum(pl.num_train_available for pl in plans.values())
    sampled = allocate(total, q)
    for lang, plan in plans.items():
        plan.p, plan.q, plan.num_sampled = p[lang], q[lang], sampled[lang]
        if plan.num_sampled and not plan.num_train_available:
            raise UsageError(f"{read_dir / (lang + '.txt')}: no training sentence left after the validation "
                             f"hold-out; give this language more text or lower --val-per-lang")
    num_buckets = shuffle_into(read_dir, read_counts, held_out, plans, out_dir, config)
    os.replace(out_dir / f".{VAL_FILE}.tmp", out_dir / VAL_FILE)
    return {"total": total, "num_shuffle_buckets": num_buckets,
            "languages": {lang: vars(plan) for lang, plan in plans.items()}}


def shuffle_into(read_dir: Path, read_counts: dict, held_out: set[str], plans: dict[str, LangPlan],
                 out_dir: Path, config: SampleConfig) -> int:
    """Write every sampled copy (no text of ``held_out``, every language's validation texts) to a random
    bucket, then shuffle the buckets one by one into train.tsv."""
    est_bytes = sum(plans[lang].num_sampled * (read_counts[lang]["num_bytes"] / max(1, plans[lang].num_read) + 4)
                    for lang in plans)
    num_buckets = max(1, math.ceil(est_bytes / (config.bucket_mb * 2**20)))
    bucket_dir = out_dir / ".buckets"
    shutil.rmtree(bucket_dir, ignore_errors=True)
    bucket_dir.mkdir()
    buckets = [open(bucket_dir / f"{k:05d}.tsv", "w", encoding="utf-8") for k in range(num_buckets)]
    bucket_rng = seeded(config.seed, "buckets")
    bar = tqdm(total=sum(pl.num_sampled for pl in plans.values()), unit="sent", desc="sample", unit_scale=True)
    for lang, plan in plans.items():
        repeats, remainder = divmod(plan.num_sampled, max(1, plan.num_train_available))
        extra = select_flags(plan.num_train_available, remainder, seeded(config.seed, lang, "extra"))
        flags = select_flags(plan.num_read, plan.num_val, seeded(config.seed, lang, "val"))
        for sentence, more in zip(iter_train(read_dir / f"{lang}.txt", held_out, flags), extra):
            for _ in range(repeats + more):
                buckets[bucket_rng.randrange(num_buckets)].write(f"{lang}\t{sentence}\n")
                bar.update()
    bar.close()
    for f in buckets:
        f.close()
    tmp = out_dir / f".{TRAIN_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for k in range(num_buckets):
            path = bucket_dir / f"{k:05d}.tsv"
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            seeded(config.seed, "shuffle", str(k)).shuffle(lines)
            out.writelines(lines)
            path.unlink()
    os.replace(tmp, out_dir / TRAIN_FILE)
    bucket_dir.rmdir()
    return num_buckets
