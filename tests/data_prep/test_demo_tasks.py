"""Demo task files: the held-out split of a generated raw directory in the default corpus's layout, and every
generated task read back by the real loaders of ``python -m data_prep tasks``."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from data_prep import demo_tasks
from data_prep.tasks.cli import main as tasks_main
from ds_kd.schema import LANGS
from ds_kd.data.tasks import TASKS, load_split

FILLER = ("the a selected cell text window dialog opens shows value field sheet chart slide page object "
          "formula style list button option file").split()


def sentence(rng: random.Random, lang: str) -> str:
    words = [f"{lang}{rng.choice(FILLER)}" for _ in range(rng.randint(4, 9))]
    for _ in range(rng.randint(0, 2)):
        words.insert(rng.randrange(len(words)), rng.choice([*demo_tasks.PRODUCTS[:6], *demo_tasks.MENUS[lang][:5],
                                                            str(rng.randint(1, 99))]))
    return " ".join(words) + "."


def write_raw(raw: Path, num_pages: int = 90) -> None:
    """Pages of every module with aligned paragraphs in all eight languages; a few repeated paragraphs."""
    modules = [*demo_tasks.MODULES, "shared"]
    rows = {lang: [] for lang in LANGS}
    for n in range(num_pages):
        page = f"{modules[n % len(modules)]}/guide/page{n}.html"
        for k in range(8):
            for lang in LANGS:
                if lang == "hi" and k % 2:
                    continue  # fewer Hindi paragraphs, as in the real corpus
                text = "Choose Format - Cells." if k == 7 else " ".join(
                    sentence(random.Random(f"{n}:{k}:{lang}"), lang) for _ in range(1 + k % 3))
                rows[lang].append((page, f"par_id{k}", text))
    for lang, lang_rows in rows.items():
        demo_tasks.write_language(raw, lang, lang_rows)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_raw(root / "raw")
    argv = ["--raw", str(root / "raw"), "--pretrain-raw", str(root / "pretrain"), "--heldout", str(root / "heldout"),
            "--out", str(root / "src"), "--holdout", "0.5", "--num-train", "120", "--num-dev", "30",
            "--num-test", "40"]
    assert demo_tasks.main(argv) == 0
    assert tasks_main(["--task", "all", "--src", str(root / "src"), "--out", str(root / "tasks")]) == 0
    return root


def keyed(raw: Path, lang: str) -> list[tuple[str, str, str]]:
    return demo_tasks.read_language(raw, lang)


def test_heldout_disjoint_from_pretraining_by_key_and_text(built):
    for lang in LANGS:
        original, held, kept = (keyed(built / d, lang) for d in ("raw", "heldout", "pretrain"))
        assert held and kept
        assert not {(p, i) for p, i, _ in held} & {(p, i) for p, i, _ in kept}
        assert not {t for *_, t in held} & {t for *_, t in kept}  # no held-out text is pretraining text
        assert len(held) + len(kept) <= len(original)
        # The repeated paragraph is pretraining text, so it never appears held out.
        assert "Choose Format - Cells." not in {t for *_, t in held}
        # Pages, not single paragraphs, are held out: every language holds out the same pages.
        assert {p for p, *_ in held} <= {p for p, *_ in keyed(built / "heldout", "en")}
    manifest = json.loads((built / "heldout" / "manifest.json").read_text())
    assert set(manifest["pages_per_role"]) == {"train", "dev", "test"}
    # The corpus command reads <pretrain>/<lang>/ like any raw directory.
    from data_prep.read import check_lang_dir

    assert check_lang_dir(built / "pretrain" / "hi")


def test_split_is_deterministic_for_a_seed(built, tmp_path):
    demo_tasks.split_heldout(built / "raw", tmp_path / "p0", tmp_path / "h0", 0.5, seed=0)
    demo_tasks.split_heldout(built / "raw", tmp_path / "p1", tmp_path / "h1", 0.5, seed=1)
    same = (tmp_path / "h0" / "alignment" / "en.tsv").read_text()
    assert same == (built / "heldout" / "alignment" / "en.tsv").read_text()
    assert same != (tmp_path / "h1" / "alignment" / "en.tsv").read_text()


def test_rerun_with_other_settings_is_refused_naming_them_and_overwrite_rebuilds(built, tmp_path, capsys):
    """The data_prep re-run rule: same settings skipped, other settings refused naming them (never the old files
    handed back), --overwrite rebuilds."""
    base = ["--heldout", str(built / "heldout"), "--num-train", "120", "--num-dev", "30", "--num-test", "40"]
    out = tmp_path / "src"
    assert demo_tasks.main([*base, "--out", str(out)]) == 0
    capsys.readouterr()
    assert demo_tasks.main([*base, "--out", str(out)]) == 0
    assert "task files done already" in capsys.readouterr().out
    assert demo_tasks.main([*base[:2], "--num-train", "60", *base[4:], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "other settings (sizes.num_train: 120 -> 60)" in err and "--overwrite" in err
    assert demo_tasks.main([*base[:2], "--num-train", "60", *base[4:], "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["sizes"]["num_train"] == 60
    split = ["--raw", str(built / "raw"), "--pretrain-raw", str(built / "pretrain"), "--heldout",
             str(built / "heldout"), "--holdout", "0.5"]
    assert demo_tasks.main(split) == 0 and "held-out split done already" in capsys.readouterr().out
    assert demo_tasks.main([*split[:-1], "0.3"]) == 2
    assert "fraction: 0.5 -> 0.3" in capsys.readouterr().err


def test_every_task_loads_with_english_train_and_the_papers_test_languages(built):
    for task, spec in TASKS.items():
        manifest = json.loads((built / "tasks" / task / "manifest.json").read_text())
        assert manifest["num_removed"] == 0
        assert list(manifest["counts"]["train"]) == ["en"]
        assert set(manifest["counts"]["test"]) == set(spec.test_langs), task
        assert set(manifest["counts"]["dev"]) == set(spec.test_langs), task
        assert manifest["missing_test_langs"] == []


def labels_of(kind: str, records: list[dict]) -> Counter:
    if kind == "pair":
        return Counter(r["label"] for r in records)
    if kind == "tagging":
        return Counter(t[2:] for r in records for t in r["tags"] if t != "O")
    if kind == "intent_slot":
        return Counter(r["intent"] for r in records)
    return Counter(t for r in records for t in r["logical_form"].split() if t.startswith("[SL:"))


@pytest.mark.parametrize("task", list(TASKS))
def test_labels_present_in_every_split_and_language(built, task):
    spec = TASKS[task]
    expected = {"xnli": {"entailment", "neutral", "contradiction"}, "pawsx": {"0", "1"},
                "wikiann": {"PER", "LOC", "ORG"}, "matis": set(f"help_{m}" for m in demo_tasks.MODULES),
                "mtop": {"[SL:PRODUCT", "[SL:MENU", "[SL:NUMBER"}}[task]
    train = labels_of(spec.kind, load_split(built / "tasks", task, "train", "en"))
    assert set(train) == expected
    for split in ("dev", "test"):
        for lang in spec.test_langs:
            found = labels_of(spec.kind, load_split(built / "tasks", task, split, lang))
            assert set(found) <= expected and len(found) >= 2, (split, lang, found)
            if spec.kind == "pair":  # classes balanced
                assert max(found.values()) - min(found.values()) <= 1, (split, lang, found)


def test_labels_follow_the_derivation(built):
    # PAWS-X negatives keep most words of sentence1 (word scrambling), positives keep all of them.
    pairs = load_split(built / "tasks", "pawsx", "test", "fr")
    for r in pairs:
        a, b = Counter(r["text_a"].split()), Counter(r["text_b"].split())
        if r["label"] == "0":
            assert r["text_a"] != r["text_b"] and sum((a & b).values()) >= len(r["text_a"].split()) - 1
        else:
            assert r["text_b"].rstrip(".") == r["text_a"].rstrip(".")
    # XNLI entailment hypotheses are part of their premise.
    for r in load_split(built / "tasks", "xnli", "test", "de"):
        if r["label"] == "entailment":
            assert r["text_b"] in r["text_a"]
    # Tags come from the word lists of the language; mTOP slots copy those words.
    for r in load_split(built / "tasks", "wikiann", "test", "es"):
        for token, tag in zip(r["tokens"], r["tags"]):
            if tag.endswith("LOC"):
                assert token in demo_tasks.MENUS["es"]
            if tag.endswith("ORG"):
                assert token in demo_tasks.PRODUCTS
    for r in load_split(built / "tasks", "mtop", "test", "hi"):
        assert r["logical_form"].startswith(f"[IN:HELP_{r['domain'].upper()}")


def test_train_and_test_examples_come_from_different_pages(built):
    roles = dict(line.split("\t") for line in (built / "heldout" / "pages.tsv").read_text().splitlines())
    assert {"train", "dev", "test"} <= set(roles.values())
    train_text = {" ".join(r["tokens"]) for r in load_split(built / "tasks", "matis", "train", "en")}
    test_text = {" ".join(r["tokens"]) for r in load_split(built / "tasks", "matis", "test", "en")}
    assert train_text and test_text and not train_text & test_text


def test_bad_raw_directory_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "raw" / "en").mkdir(parents=True)
    (tmp_path / "raw" / "en" / "help.txt").write_text("a\n")
    assert demo_tasks.main(["--raw", str(tmp_path / "raw"), "--pretrain-raw", str(tmp_path / "p"),
                            "--heldout", str(tmp_path / "h"), "--langs", "en"]) == 2
    assert "alignment/en.tsv: not found" in capsys.readouterr().err
    (tmp_path / "raw" / "alignment").mkdir()
    (tmp_path / "raw" / "alignment" / "en.tsv").write_text("page-without-id\n")
    assert demo_tasks.main(["--raw", str(tmp_path / "raw"), "--pretrain-raw", str(tmp_path / "p"),
                            "--heldout", str(tmp_path / "h"), "--langs", "en"]) == 2
    assert "alignment/en.tsv:1:" in capsys.readouterr().err
