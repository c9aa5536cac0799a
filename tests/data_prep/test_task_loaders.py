"""Every benchmark loader on tiny files in its release format (quirks and malformed rows included), and the
``tasks`` command end to end into the layout that :func:`ds_kd.data.tasks.load_split` reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.tasks import LangChoice, TaskDataError, load_task
from data_prep.tasks.cli import main
from ds_kd.manifest import read_manifest
from ds_kd.data.tasks import TASKS, load_split
import tests.helpers.taskfixtures as fx


def counts(data) -> dict:
    return {key: len(rows) for key, rows in data.records.items()}


def quirk_total(data, quirk_substring: str) -> int:
    return sum(n for counter in data.normalised.values() for q, n in counter.items() if quirk_substring in q)


def by_id(data, split: str, lang: str) -> dict:
    return {r["id"]: r for r in data.records[(split, lang)]}


# --- XNLI ----------------------------------------------------------------------------------------------------

def test_xnli_reads_release_and_normalises_contradictory(tmp_path):
    src, expected, _ = fx.write_xnli(tmp_path)
    data = load_task("xnli", src)
    assert counts(data) == expected
    train = data.records[("train", "en")]
    assert [r["label"] for r in train] == ["entailment", "contradiction", "neutral", "contradiction"]
    assert quirk_total(data, "contradictory") == 1
    assert train[0]["text_a"] == 'He said "yes'  # a lone quote is text, not CSV quoting
    test_fr = by_id(data, "test", "fr")
    assert test_fr["101"]["label"] == "neutral" and test_fr["101"]["text_b"] == "fr hypothesis 1"


def test_xnli_language_choice_and_translated_train(tmp_path):
    src, _, _ = fx.write_xnli(tmp_path)
    data = load_task("xnli", src, LangChoice(frozenset({"en", "hi"}), frozenset({"en", "fr"})))
    assert sorted(counts(data)) == [("dev", "en"), ("dev", "hi"), ("test", "en"), ("test", "hi"),
                                    ("train", "en"), ("train", "fr")]
    assert [r["label"] for r in data.records[("train", "fr")]] == ["contradiction", "neutral"]
    with pytest.raises(TaskDataError, match="sw"):
        load_task("xnli", src, LangChoice(frozenset({"en", "sw"})))


@pytest.mark.parametrize("kind", ["label", "fields"])
def test_xnli_malformed_row_names_file_and_line(tmp_path, kind):
    src, _, (path, line) = fx.write_xnli(tmp_path, malformed=kind)
    with pytest.raises(TaskDataError, match=f"{path}:{line}:"):
        load_task("xnli", src)


# --- PAWS-X --------------------------------------------------------------------------------------------------

def test_pawsx_removes_and_counts_blank_cells(tmp_path):
    src, expected, _ = fx.write_pawsx(tmp_path)
    data = load_task("pawsx", src, LangChoice(None, frozenset({"en", "fr"})))
    expected[("train", "fr")] = 2
    assert counts(data) == expected
    removed = {(r.split, r.lang, r.id, r.reason.split(" ")[1]) for r in data.removed}
    assert removed == {("test", "de", "50", "label"), ("dev", "ja", "51", "sentence"),
                       ("train", "fr", "32035", "sentence")}
    assert sorted((Path(r.file).name, r.line) for r in data.removed) == [  # line numbers count the header
        ("dev_2k.tsv", 5), ("test_2k.tsv", 5), ("translated_train.tsv", 4)]
    assert data.records[("train", "en")][0] == {"id": "1", "text_a": 'en "first" sentence 0',
                                                "text_b": "en second sentence 0", "label": "0"}


@pytest.mark.parametrize("kind", ["label", "fields"])
def test_pawsx_malformed_row_names_file_and_line(tmp_path, kind):
    src, _, (path, line) = fx.write_pawsx(tmp_path, malformed=kind)
    with pytest.raises(TaskDataError, match=f"{path}:{line}:"):
        load_task("pawsx", src)


# --- WikiANN -------------------------------------------------------------------------------------------------

def test_wikiann_xtreme_three_layouts(tmp_path):
    src, expected, _ = fx.write_wikiann_xtreme(tmp_path)
    data = load_task("wikiann", src)
    assert data.source_format.startswith("XTREME")
    assert counts(data) == expected
    en = data.records[("test", "en")]
    assert en[1]["tokens"] == ["Angela", "Merkel", "visited", "http://x.org:80"]
    assert en[1]["tags"] == ["B-PER", "I-PER", "O", "O"]
    assert data.records[("dev", "de")][1] == {"id": "de-dev:6", "tokens": ["United", "Nations"],
                                              "tags": ["B-ORG", "I-ORG"]}  # CRLF stripped, line of the sentence
    assert data.records[("test", "fr")][0]["tokens"] == ["Paris", "is", "nice"]  # read from fr.tar.gz


@pytest.mark.parametrize("kind", ["tag", "prefix", "fields"])
def test_wikiann_xtreme_malformed_line(tmp_path, kind):
    src, _, (path, line) = fx.write_wikiann_xtreme(tmp_path, malformed=kind)
    with pytest.raises(TaskDataError, match=f"{path}:{line}:"):
        load_task("wikiann", src)


@pytest.mark.parametrize("per_language", [True, False])
def test_wikiann_saved_by_datasets(tmp_path, per_language):
    src, expected = fx.write_wikiann_hf(tmp_path, per_language=per_language)
    data = load_task("wikiann", src)
    assert data.source_format.startswith("datasets")
    assert counts(data) == expected
    rec = data.records[("dev", "en")][1]
    assert rec["tokens"][:2] == ["Angela", "Merkel"] and rec["tags"] == ["B-PER", "I-PER", "O", "O"]


JA_SENTENCES = [[("ジョン", "B-PER"), ("\u3000", "I-PER"), ("スミス", "I-PER"), ("は", "O")],
                [("東京", "B-LOC"), ("に", "O"), ("いる", "O")]]


def write_ja_wikiann(root: Path) -> Path:
    """Japanese train and test files as released: an ideographic space (U+3000) is a token, inside a name
    (line 2)."""
    src = root / "wikiann_ja"
    src.mkdir()
    lines = [line for sentence in JA_SENTENCES for line in [*(f"ja:{t}\t{tag}" for t, tag in sentence), ""]]
    for split in ("train", "test"):
        (src / f"ja-{split}").write_text("\n".join(lines), encoding="utf-8")
    return src


JA_ONLY = LangChoice(frozenset({"ja"}), frozenset())


def test_wikiann_whitespace_token_is_kept_by_default_and_counted(tmp_path):
    data = load_task("wikiann", write_ja_wikiann(tmp_path), JA_ONLY)
    first, second = data.records[("test", "ja")]
    assert first["tokens"] == ["ジョン", "\u3000", "スミス", "は"]
    assert first["tags"] == ["B-PER", "I-PER", "I-PER", "O"]  # the name stays one entity
    assert second["tokens"] == ["東京", "に", "いる"]
    assert data.normalised == {"test.ja": {"whitespace-only token kept": 1}} and not data.removed


def test_wikiann_whitespace_token_can_remove_its_sentence_or_stop(tmp_path):
    src = write_ja_wikiann(tmp_path)
    data = load_task("wikiann", src, JA_ONLY, wikiann_whitespace="remove")
    assert [r["tokens"] for r in data.records[("test", "ja")]] == [["東京", "に", "いる"]]
    assert [(r.file, r.line, r.reason, r.id) for r in data.removed] == [
        (str(src / "ja-test"), 2, "whitespace-only token", "ja-test:1")]
    with pytest.raises(TaskDataError, match=f"{src / 'ja-test'}:2: token is only whitespace"):
        load_task("wikiann", src, JA_ONLY, wikiann_whitespace="error")
    (src / "ja-test").write_text("ja:\tO\n", encoding="utf-8")  # nothing at all after the prefix: malformed
    with pytest.raises(TaskDataError, match=f"{src / 'ja-test'}:1: empty token"):
        load_task("wikiann", src, JA_ONLY)


def test_wikiann_whitespace_rule_in_the_datasets_format_and_the_command(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    src = tmp_path / "hf_ja"
    rows = {"tokens": [[t for t, _ in s] for s in JA_SENTENCES], "ner_tags": [[tag for _, tag in s] for s in JA_SENTENCES],
            "langs": [["ja"] * len(s) for s in JA_SENTENCES]}
    DatasetDict({"test": Dataset.from_dict(rows)}).save_to_disk(str(src))
    kept = load_task("wikiann", src, JA_ONLY)
    assert kept.records[("test", "ja")][0]["tokens"][1] == "\u3000"
    removed = load_task("wikiann", src, JA_ONLY, wikiann_whitespace="remove")
    assert len(removed.records[("test", "ja")]) == 1 and removed.removed[0].id == "test-0"
    out = tmp_path / "out"
    assert main(["--task", "wikiann", "--src", str(write_ja_wikiann(tmp_path)), "--out", str(out), "--langs", "ja",
                 "--train-langs", "ja", "--wikiann-whitespace-tokens", "remove"]) == 0
    manifest = read_manifest(out / "wikiann")
    assert manifest["counts"] == {"train": {"ja": 1}, "test": {"ja": 1}}
    assert manifest["removed"] == {split: {"ja": {"whitespace-only token": 1}} for split in ("train", "test")}
    assert manifest["options"]["wikiann_whitespace"] == "remove"


# --- MultiATIS++ ---------------------------------------------------------------------------------------------

def test_matis_removes_test_tag_count_mismatch(tmp_path):
    src, expected, _ = fx.write_matis(tmp_path)
    data = load_task("matis", src)
    assert counts(data) == expected
    assert [(r.split, r.lang, r.id, r.line) for r in data.removed] == [("test", "fr", "4", 5)]
    rec = by_id(data, "test", "de")["3"]
    assert rec["intent"] == "atis_flight#atis_airfare"
    assert rec["tokens"] == ["flights", "and", "fares", "to", "dallas"]
    assert rec["slots"][-1] == "B-toloc.city_name"


@pytest.mark.parametrize("kind", ["count", "slot"])
def test_matis_malformed_row_names_file_and_line(tmp_path, kind):
    src, _, (path, line) = fx.write_matis(tmp_path, malformed=kind)
    with pytest.raises(TaskDataError, match=f"{path}:{line}:"):
        load_task("matis", src)


# --- mTOP ----------------------------------------------------------------------------------------------------

def test_mtop_records_and_normalised_quirks(tmp_path):
    src, expected, _ = fx.write_mtop(tmp_path)
    data = load_task("mtop", src)
    assert counts(data) == expected
    test = by_id(data, "test", "en")
    assert test["2"]["logical_form"] == "[IN:CREATE_ALARM [SL:DATE_TIME for 7 am ] ]"
    assert test["3"]["tokens"] == ["play", '"', "Hello", '"']
    assert test["3"]["logical_form"] == "[IN:PLAY_MUSIC [SL:MUSIC_TRACK_TITLE Hello ] ]"
    assert test["1"]["domain"] == "messaging" and test["1"]["intent"] == "IN:GET_MESSAGE"
    for quirk in ("whitespace", "case", "unescaped"):
        assert quirk_total(data, quirk) == 3  # once per English file
    assert set(data.records) >= {("dev", "de"), ("test", "de")}


@pytest.mark.parametrize("kind", ["brackets", "copy", "columns"])
def test_mtop_malformed_row_names_file_and_line(tmp_path, kind):
    src, _, (path, line) = fx.write_mtop(tmp_path, malformed=kind)
    with pytest.raises(TaskDataError, match=f"{path}:{line}:"):
        load_task("mtop", src)


def test_mtop_uncopyable_rows_can_be_removed_and_counted(tmp_path):
    src, expected, (path, line) = fx.write_mtop(tmp_path, malformed="copy")
    data = load_task("mtop", src, mtop_uncopyable="remove")
    assert counts(data) == expected
    assert [(r.file, r.line, r.id) for r in data.removed] == [(str(path), line, "91")]


def test_non_utf8_line_is_named(tmp_path):
    src, _, _ = fx.write_matis(tmp_path)
    path = src / "data" / "train_dev_test" / "dev_EN.tsv"
    path.write_bytes(path.read_bytes() + b"7\tcaf\xe9\tO\tatis_flight\n")
    with pytest.raises(TaskDataError, match=f"{path}:5: not valid UTF-8"):
        load_task("matis", src)


# --- the command end to end ----------------------------------------------------------------------------------

def write_all(root: Path) -> tuple[Path, dict]:
    src = root / "src"
    src.mkdir()
    expected = {}
    for task, writer in (("xnli", fx.write_xnli), ("pawsx", fx.write_pawsx), ("wikiann", fx.write_wikiann_xtreme),
                         ("matis", fx.write_matis), ("mtop", fx.write_mtop)):
        path, expected[task], _ = writer(root)
        path.rename(src / task)
    return src, expected


def test_cli_all_tasks_end_to_end(tmp_path, capsys):
    src, expected = write_all(tmp_path)
    out = tmp_path / "out"
    assert main(["--task", "all", "--src", str(src), "--out", str(out)]) == 0
    for task, per_split in expected.items():
        manifest = read_manifest(out / task)
        assert manifest["task"] == task and manifest["kind"] == TASKS[task].kind
        for (split, lang), n in per_split.items():
            assert manifest["counts"][split][lang] == n
            assert len(load_split(out, task, split, lang)) == n
        assert manifest["code_version"]
    xnli = read_manifest(out / "xnli")
    assert xnli["labels"] == {"label": ["contradiction", "entailment", "neutral"]}
    assert xnli["normalised"]["train"]["en"] == {"label 'contradictory' read as 'contradiction' (XNLI-MT spelling)": 1}
    matis = read_manifest(out / "matis")
    assert matis["num_removed"] == 1 and list(matis["removed"]["test"]["fr"].values()) == [1]
    assert matis["labels"]["intent"] == ["atis_airfare", "atis_flight", "atis_flight#atis_airfare"]
    removed = [json.loads(line) for line in (out / "matis" / "removed.jsonl").read_text().splitlines()]
    assert removed[0]["id"] == "4" and removed[0]["file"].endswith("test_FR.tsv")
    assert read_manifest(out / "mtop")["labels"]["ontology"][:2] == ["[IN:CREATE_ALARM", "[IN:GET_MESSAGE"]
    assert read_manifest(out / "wikiann")["missing_test_langs"] == ["es", "pt", "it", "hi"]
    rec = load_split(out, "mtop", "test", "en")[0]
    assert set(rec) >= {"id", "tokens", "logical_form"}
    assert "skipping" not in capsys.readouterr().out

    # A finished task is skipped when asked for with the same settings; other settings are refused, naming
    # what differs, and --overwrite (the older --force) rebuilds it.
    (out / "pawsx" / "dev.en.jsonl").write_text("")
    assert main(["--task", "pawsx", "--src", str(src / "pawsx"), "--out", str(out)]) == 0
    assert "same settings, skipping" in capsys.readouterr().out
    assert main(["--task", "pawsx", "--src", str(src / "pawsx"), "--out", str(out), "--langs", "en"]) == 2
    err = capsys.readouterr().err
    assert "built with other settings" in err and 'langs: "all" -> ["en"]' in err and "--overwrite" in err
    assert load_split(out, "pawsx", "dev", "en") == []  # nothing rebuilt
    assert main(["--task", "pawsx", "--src", str(src / "pawsx"), "--out", str(out), "--overwrite"]) == 0
    assert len(load_split(out, "pawsx", "dev", "en")) == 3


def test_cli_all_builds_the_tasks_present_and_names_the_release_and_command_of_each_missing_one(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for task, writer in (("pawsx", fx.write_pawsx), ("matis", fx.write_matis)):
        writer(tmp_path)[0].rename(src / task)
    out = tmp_path / "out"
    assert main(["--task", "all", "--src", str(src), "--out", str(out)]) == 0
    assert sorted(p.parent.name for p in out.glob("*/manifest.json")) == ["matis", "pawsx"]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["xnli", "wikiann", "mtop"]
    assert err[0] == (f"xnli: skipped, no {src / 'xnli'}: it comes from XNLI-1.0 and XNLI-MT-1.0 "
                      f"(github.com/facebookresearch/XNLI), or XTREME's download_data.sh xnli/; put it there, or run "
                      f"python -m data_prep tasks --task xnli --src <its folder> --out {out}")
    assert f"no {src / 'wikiann'} or {src / 'panx'}" in err[1] and "mtop.zip" in err[2]
    # nothing to build: the same lines, and a non-zero status
    (tmp_path / "empty").mkdir()
    assert main(["--task", "all", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and err[-1].startswith("error: none of the task folders") and not (tmp_path / "o2").exists()


def test_cli_malformed_source_fails_naming_line_and_writes_no_manifest(tmp_path, capsys):
    src, _, (path, line) = fx.write_matis(tmp_path, malformed="count")
    out = tmp_path / "out"
    assert main(["--task", "matis", "--src", str(src), "--out", str(out), "--langs", "en"]) == 2
    assert f"{path}:{line}:" in capsys.readouterr().err
    assert not (out / "matis" / "manifest.json").exists()


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--task", "--src", "--out", "--langs", "--train-langs", "--wikiann-format",
                   "--wikiann-whitespace-tokens", "--mtop-uncopyable", "--force"):
        assert option in text
