"""Generated multilingual text for tests and the benchmark: no download, deterministic for a seed.

Each language gets its own syllables and script (Latin with accents, Japanese kana/kanji without spaces
and 。, Hindi Devanagari with ।), sentences of a few words grouped into paragraphs of 1-3 sentences per line.
Any other language code gets Latin syllables of its own, drawn from the code (the same code, the same syllables).
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

SYLLABLES = {
    "en": "the a of and to in is it on wa ter light sun ing er".split(),
    "fr": "le la les de du et est un une é è ça tion eau ment".split(),
    "de": "der die das und ist ein ß ü ö ä sch ung keit chen".split(),
    "ja": list("のはにをがでとしたるかなきくすまみむめもアイウエオ日本語学生"),
    "hi": ["क", "ख", "ग", "म", "न", "र", "ल", "स", "है", "में", "की", "को", "प्र", "त्र"],
    "it": "il lo la di che è un una per con zione mente tto".split(),
    "es": "el la los de que y en un una ñ ción mente está".split(),
    "pt": "o a os de que e em um uma ção ões mente ão".split(),
}
ENDERS = {"ja": "。", "hi": "।"}


@functools.lru_cache(maxsize=None)
def syllables(lang: str) -> list[str]:
    """The syllables of ``lang``: :data:`SYLLABLES`, or 14 consonant-vowel syllables drawn from the code."""
    if lang in SYLLABLES:
        return SYLLABLES[lang]
    rng = random.Random(f"syllables-{lang}")
    return [rng.choice("bdfghjklmnprstvwyz") + rng.choice("aeiou") + rng.choice(["", "n", "k"]) for _ in range(14)]


def make_word(rng: random.Random, lang: str) -> str:
    pool = syllables(lang)
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, 3)))


def make_sentence(rng: random.Random, lang: str) -> str:
    words = [make_word(rng, lang) for _ in range(rng.randint(3, 12))]
    if lang == "ja":
        return "".join(words) + "。"
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + (" " + ENDERS[lang] if lang in ENDERS else ".")


def make_paragraph(rng: random.Random, lang: str) -> str:
    joiner = "" if lang == "ja" else " "
    return joiner.join(make_sentence(rng, lang) for _ in range(rng.randint(1, 3)))


def write_raw(raw_dir: Path, num_lines: dict[str, int], seed: int = 0, name: str = "text.txt") -> Path:
    """Write ``num_lines[lang]`` paragraph lines to ``<raw_dir>/<lang>/<name>`` for every language."""
    for lang, n in num_lines.items():
        rng = random.Random(f"{seed}-{lang}")
        lang_dir = raw_dir / lang
        lang_dir.mkdir(parents=True, exist_ok=True)
        with open(lang_dir / name, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(make_paragraph(rng, lang) + "\n")
    return raw_dir
