"""Held-out text is never trained on, in any language: help corpora share lines across languages (UI strings,
code, names), so the corpus's validation hold-out and the demo's held-out pages are checked against the union
of all languages."""
from __future__ import annotations

from pathlib import Path

from data_prep.demo_tasks import fraction_of, read_language, split_heldout, write_language
from data_prep.sample import SampleConfig, write_mix

SHARED = [f"Ctrl+Shift+F{i}" for i in range(60)]  # the same line in every language


def test_no_language_trains_on_another_languages_validation_text(tmp_path):
    read_dir = tmp_path / "read"
    read_dir.mkdir()
    langs = ("en", "de", "fr")
    for lang in langs:
        lines = [f"{lang} sentence {i}" for i in range(300)] + SHARED
        (read_dir / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = {lang: {"num_sentences": 360, "num_bytes": 5000} for lang in langs}
    write_mix(read_dir, counts, tmp_path / "sample", SampleConfig(total=2000, val_per_lang=36, bucket_mb=0.01))
    val = {line.split("\t", 1)[1] for line in (tmp_path / "sample" / "val.tsv").read_text("utf-8").splitlines()}
    assert val & set(SHARED)  # some shared lines were drawn for validation, so the check below means something
    train = [line.split("\t", 1) for line in (tmp_path / "sample" / "train.tsv").read_text("utf-8").splitlines()]
    assert len(train) == 2000 and {lang for lang, _ in train} == set(langs)
    assert not {text for _, text in train} & val


def test_no_held_out_demo_paragraph_is_pretraining_text_in_another_language(tmp_path):
    pages = [f"page{i}.html" for i in range(40)]
    held_page = next(p for p in pages if fraction_of(0, p) < 0.3)
    kept_page = next(p for p in pages if fraction_of(0, p) >= 0.3)
    for lang in ("en", "de"):
        rows = [(page, f"p{j}", f"{lang} {page} paragraph {j}") for page in pages for j in range(3)]
        # the same UI string, held out on one page in English, on a pretraining page in German
        rows.append((held_page if lang == "en" else kept_page, "ui", "Ctrl+Shift+F5"))
        write_language(tmp_path / "raw", lang, rows)
    split_heldout(tmp_path / "raw", tmp_path / "pretrain", tmp_path / "heldout", 0.3, langs=("en", "de"))
    pretrain = {text for lang in ("en", "de") for _, _, text in read_language(tmp_path / "pretrain", lang)}
    held = {text for lang in ("en", "de") for _, _, text in read_language(tmp_path / "heldout", lang)}
    assert "Ctrl+Shift+F5" in pretrain and held and not held & pretrain
