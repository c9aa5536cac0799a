"""A trimmed model fed text outside its corpus: every command that feeds text to a model reports the
unknown-token rate and warns above 1%, naming the model, the text and what the model was trimmed to; text inside
the trimming corpus gets no warning.

The model: a tiny BERT over a Unigram tokenizer learnt on English and Japanese, trimmed (``trim_vocab``) to
English text. English task/held-out text is that text (inside); Japanese is outside (its characters are gone).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from data_prep.trim_vocab import trim
from ds_kd.manifest import write_manifest
from tests.data_prep.test_trim_vocab import lines, make_checkpoint, train_tokenizer

EN = lines(["en"], 40, seed=1)
JA = lines(["ja"], 40, seed=1)


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    full = make_checkpoint(root / "full", train_tokenizer("unigram", lines(["en", "ja"], 150, seed=0)), bare=False)
    (root / "corpus.tsv").write_text("".join(f"en\t{t}\n" for t in EN), encoding="utf-8")
    trim(full, [root / "corpus.tsv"], root / "trimmed")
    return root / "trimmed"


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning:" in line and "unknown to the tokenizer" in line]


def assert_warns_only_for_japanese(text: str, model: Path, ja_name: str, en_name: str, reported: bool = True) -> str:
    """One warning, for the Japanese text, naming the model and what it was trimmed to; with ``reported`` the
    English text's rate is in the report line. Returns the warning."""
    found = warnings_in(text)
    assert len(found) == 1, text
    assert ja_name in found[0] and str(model) in found[0]
    assert "trimmed by trim_vocab from" in found[0] and "the pieces of en text" in found[0]
    assert en_name not in found[0]
    if reported:
        assert "[vocab] unknown-token rate" in text and en_name in text  # the inside text: reported, not warned
    return found[0]


def test_trimmed_model_records_what_it_was_trimmed_to(trimmed):
    record = json.loads((trimmed / "config.json").read_text())["ds_kd"]["trimmed_to"]
    manifest = json.loads((trimmed / "manifest.json").read_text())
    assert record["languages"] == manifest["languages"] == ["en"]
    assert record["lines_per_language"] == {"en": len(EN)}
    assert record["vocab_before"] == manifest["vocab_before"] > record["vocab_after"] == manifest["vocab_after"]
    assert record["corpus"] == manifest["corpus"] and record["corpus"][0].endswith("corpus.tsv")


def write_tagging(root: Path) -> Path:
    """wikiann: English train/dev/test from the trimming text, a Japanese test (3-character "words")."""
    def records(texts: list[str], words) -> list[dict]:
        return [{"id": str(i), "tokens": words(t), "tags": ["B-LOC"] + ["O"] * (len(words(t)) - 1)}
                for i, t in enumerate(texts)]

    folder = root / "wikiann"
    folder.mkdir(parents=True)
    for split, lang, texts, words in [("train", "en", EN, str.split), ("dev", "en", EN[:8], str.split),
                                      ("test", "en", EN[8:16], str.split),
                                      ("test", "ja", JA[:8], lambda t: [t[i:i + 3] for i in range(0, len(t), 3)])]:
        (folder / f"{split}.{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(texts, words)),
                                                      encoding="utf-8")
    write_manifest(folder, "tasks", task="wikiann")  # a task is present with its manifest (the grid checks it)
    return root


TINY = {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "max_len": 64, "device": "cpu"}


def test_fine_tuning_warns_for_the_test_language_outside_the_trimmed_vocabulary(trimmed, tmp_path, capsys):
    from ds_kd.finetune.job import FinetuneConfig, run

    data = write_tagging(tmp_path / "data")
    result = run(FinetuneConfig(model=str(trimmed), task="wikiann", data=str(data), out=str(tmp_path / "job"),
                                threads=1, **TINY))
    ja, en = str(data / "wikiann" / "test.ja.jsonl"), str(data / "wikiann" / "test.en.jsonl")
    assert_warns_only_for_japanese(capsys.readouterr().out, trimmed, ja, en)
    rates = result.unknown_token_rates
    assert rates[ja] > 0.3 and rates[en] == rates[str(data / "wikiann" / "train.en.jsonl")] == 0.0
    assert json.loads((tmp_path / "job" / "result.json").read_text())["unknown_token_rates"] == rates


def test_grid_shows_its_jobs_warnings(trimmed, tmp_path, capsys):
    from ds_kd.eval.grid import GridConfig, ModelRow, run_grid

    data = write_tagging(tmp_path / "data")
    result = run_grid(GridConfig(rows=[ModelRow("trimmed", str(trimmed))], tasks=["wikiann"], data=str(data),
                                 seeds=[1], out=str(tmp_path / "grid"), workers=1, finetune={**TINY}))
    assert result.num_done == 1
    warning = assert_warns_only_for_japanese(capsys.readouterr().out, trimmed, str(data / "wikiann" / "test.ja.jsonl"),
                                             "test.en.jsonl", reported=False)  # the job's report is in its log
    assert warning.startswith("[grid] trimmed")


def test_retrieval_warns_for_the_language_outside_the_trimmed_vocabulary(trimmed, tmp_path, capsys):
    from ds_kd.eval.retrieval import RetrievalConfig, run
    from tests.eval.test_retrieval import write_heldout

    heldout = write_heldout(tmp_path / "heldout", {"en": EN[:20], "ja": JA[:20]})
    result = run({"trimmed": trimmed}, heldout, tmp_path / "out", ["en", "ja"], RetrievalConfig(max_len=64))
    ja, en = str(heldout / "ja" / "help.txt"), str(heldout / "en" / "help.txt")
    assert_warns_only_for_japanese(capsys.readouterr().out, trimmed, ja, en)
    assert result["unknown_token_rates"]["trimmed"][ja] > 0.3 and result["unknown_token_rates"]["trimmed"][en] == 0


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_speed_warns_for_text_outside_the_trimmed_vocabulary(trimmed, tmp_path, capsys, lang):
    from ds_kd.eval.speed import SpeedConfig, run

    run({"trimmed": trimmed}, tmp_path / "out", texts=EN if lang == "en" else JA, texts_from=f"{lang}/help.txt",
        cfg=SpeedConfig(num_sentences=4, batch_size=2, num_warmup=0, num_repeats=1, threads=1))
    out = capsys.readouterr().out
    assert f"{lang}/help.txt" in out
    assert len(warnings_in(out)) == (lang == "ja")


def test_distillation_data_check_warns_for_the_shards_language_outside_the_teachers_vocabulary(trimmed, tmp_path,
                                                                                               caplog):
    from data_prep.bpe import BpeConfig
    from data_prep.corpus import CorpusConfig, run as corpus
    from data_prep.read import ReadConfig
    from data_prep.sample import SampleConfig
    from data_prep.shard import ShardConfig
    from ds_kd.distill.run import DistillRunConfig, run

    for lang, texts in (("en", EN), ("ja", JA)):
        (tmp_path / "raw" / lang).mkdir(parents=True)
        (tmp_path / "raw" / lang / "text.txt").write_text("\n".join(texts * 5) + "\n", encoding="utf-8")
    corpus(CorpusConfig(raw=tmp_path / "raw", out=tmp_path / "corpus", langs=("en", "ja"), read=ReadConfig(),
                        sample=SampleConfig(total=200, seed=1, val_per_lang=20, bucket_mb=0.05),
                        bpe=BpeConfig(vocab_size=120), tokenizer=trimmed,
                        shard=ShardConfig(block_size=50, num_workers=1, batch_size=64)))
    cfg = DistillRunConfig(deepspeed_config="ds_configs/zero2.json", data=str(tmp_path / "corpus"),
                           out=str(tmp_path / "kd"), teacher=str(trimmed), student="tiny-leanbert", max_steps=1,
                           max_len=100000)  # refused after the data check, before any work
    with caplog.at_level(logging.INFO, logger="ds_kd"), pytest.raises(ValueError, match="--max-len 100000"):
        run(cfg)
    shards = tmp_path / "corpus" / "shards"
    assert_warns_only_for_japanese(caplog.text, trimmed, f"{shards / 'val'} (ja)", f"{shards / 'val'} (en)")
