"""Unknown-token rate of the text a command feeds a model: reported, and warned about above :data:`WARN_RATE`.

A tokenizer turns text it does not cover into its unknown token, and the model then sees nothing of that text;
nothing fails, the scores just drop. A model trimmed to one corpus's pieces (``python -m data_prep trim_vocab``)
is the common case: Japanese news through an e5 trimmed to English and French text came out 7.9% unknown (0%
with the full tokenizer). Every command that feeds text to a model (fine-tuning and the grid's jobs,
retrieval, speed, distillation's data check) measures the rate on the text it reads (per file, or per language
of a shards split), prints one line of rates, and one warning per text above :data:`WARN_RATE` naming the
model directory, the text and, for a trimmed model, what it was trimmed to (``config.json``'s
``ds_kd.trimmed_to``, written by ``trim_vocab``).

Not measured: a Unigram tokenizer re-splits a word whose piece was trimmed into smaller pieces that are all
known (English through the trimmed e5: 14% more pieces, no unknown one); the warning for a trimmed model
says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

WARN_RATE = 0.01
"""Share of a text's tokens (special tokens left out) that are unknown above which a command warns."""
TRIMMED_KEY = "trimmed_to"
"""Key of the ``ds_kd`` record of a trimmed model's ``config.json`` (see :func:`trimmed_to`)."""


def unknown_rate(id_lists: Iterable[Sequence[int]], unk_id: int | None, special_ids: Iterable[int] = ()) -> float:
    """Share of the ids that are ``unk_id``, ids in ``special_ids`` (other than ``unk_id``) left out of the count;
    0.0 for no ids or a tokenizer without an unknown token (byte-level ones cover every text)."""
    skip = set(special_ids) - {unk_id}
    unknown = total = 0
    for ids in id_lists:
        for i in ids:
            if i not in skip:
                total += 1
                unknown += i == unk_id
    return unknown / total if total and unk_id is not None else 0.0


def text_unknown_rate(tokenizer, texts: Sequence[str]) -> float:
    """:func:`unknown_rate` of ``texts`` under a ``transformers`` tokenizer (no special tokens added)."""
    if not texts:
        return 0.0
    return unknown_rate(tokenizer(list(texts), add_special_tokens=False)["input_ids"], tokenizer.unk_token_id)


def trimmed_to(model_dir: Path | str) -> dict | None:
    """What a trimmed model was trimmed to (``vocab_before``, ``vocab_after``, ``languages``, ``corpus``), from
    its ``config.json``; None for a model that was not trimmed or has no ``config.json``."""
    from ds_kd.models.modeldir import DS_KD_KEY, read_config

    try:
        return read_config(model_dir).get(DS_KD_KEY, {}).get(TRIMMED_KEY)
    except FileNotFoundError:
        return None


def describe_trim(record: dict) -> str:
    langs = ", ".join(record.get("languages") or []) or "unknown languages"
    corpus = record.get("corpus") or []
    files = ", ".join(corpus[:3]) + (f" and {len(corpus) - 3} more" if len(corpus) > 3 else "")
    return (f"trimmed by trim_vocab from {record['vocab_before']} to {record['vocab_after']} tokens, the pieces "
            f"of {langs} text ({files})")


def unknown_warnings(model_dir: Path | str, rates: dict[str, float], threshold: float = WARN_RATE) -> list[str]:
    """One warning per text of ``rates`` (text name -> unknown-token rate) above ``threshold``, naming the model
    directory, the text, and what the model was trimmed to where it was."""
    record = trimmed_to(model_dir)
    if record:
        why = (f"{model_dir} was {describe_trim(record)}: text outside that corpus loses its pieces (and a Unigram "
               f"tokenizer also cuts known words into more pieces). Use the untrimmed model, or trim it on a "
               f"corpus that covers this text")
    else:
        why = "its tokenizer does not cover this text; use a model whose tokenizer does"
    return [f"warning: {100 * rate:.1f}% of the tokens of {name} are unknown to the tokenizer of {model_dir}: "
            f"scores on this text will be low. {why}" for name, rate in rates.items() if rate > threshold]


def _print(line: str) -> None:
    print(line, flush=True)


def report_unknown(model_dir: Path | str, rates: dict[str, float], say: Callable[[str], None] = _print) -> list[str]:
    """``say`` (default: print) one line of every rate, then each warning of :func:`unknown_warnings`; returns
    the warnings."""
    if rates:
        say(f"[vocab] unknown-token rate under {model_dir}'s tokenizer: "
            + ", ".join(f"{name} {100 * rate:.2f}%" for name, rate in rates.items()))
    warnings = unknown_warnings(model_dir, rates)
    for line in warnings:
        say(f"[vocab] {line}")
    return warnings


def shard_unknown_rates(shard_dir: Path | str, manifest: dict, split: str = "val") -> dict[str, float]:
    """Per language of a shards split (``<shard_dir>/<split> (<lang>)``): the share of its tokens that are the
    tokenizer's unknown token, every other special token left out; empty when the tokenizer has no unknown
    token. Reads every block of the split (the validation split is small)."""
    import numpy as np

    from ds_kd.data.shards import BlockTable, lang_codes, special_ids, unmasked_ids

    unk = special_ids(manifest, shard_dir).get("unk")
    if unk is None:
        return {}
    codes = lang_codes(manifest, shard_dir)
    skip = sorted(set(unmasked_ids(manifest, shard_dir)) - {unk})
    unknown, total = np.zeros(len(codes), np.int64), np.zeros(len(codes), np.int64)
    table = BlockTable.open(shard_dir, split, manifest)
    for index in range(table.num_blocks):
        block = table.read(index)
        token_langs = np.repeat(block.langs.astype(np.int64), np.diff(block.offsets.astype(np.int64)))
        counted = ~np.isin(block.tokens, skip)
        total += np.bincount(token_langs[counted], minlength=len(codes))
        unknown += np.bincount(token_langs[block.tokens == unk], minlength=len(codes))
    return {f"{Path(shard_dir) / split} ({code})": float(unknown[i] / total[i])
            for i, code in enumerate(codes) if total[i]}
