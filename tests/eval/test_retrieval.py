"""Tatoeba-style retrieval: perfect by construction scores 1.0, a permuted gold scores its fixed points, and
the command writes per-language results for every model."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ds_kd.eval.retrieval import RetrievalConfig, evaluate_model, pick_layer, read_pairs, select_pairs, top1_accuracy
from tests.conftest import load_script
from tests.helpers.finetune_fixtures import FILLERS, NAMES, CITIES, broken_model_dirs, make_model_dir

WORDS = NAMES + CITIES + FILLERS

retrieval_main = load_script("retrieval").main


def write_heldout(root: Path, texts: dict[str, list[str]]) -> Path:
    """<root>/<lang>/help.txt and <root>/alignment/<lang>.tsv, line i with key (page, par_i)."""
    (root / "alignment").mkdir(parents=True, exist_ok=True)
    for lang, lines in texts.items():
        (root / lang).mkdir(exist_ok=True)
        (root / lang / "help.txt").write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        (root / "alignment" / f"{lang}.tsv").write_text("".join(f"p.html\tpar_{i}\n" for i in range(len(lines))))
    return root


def sentences(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(8)) + f" {i}" for i in range(num)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"base": make_model_dir(root / "base", "tiny-base", seed=1),
            "lean": make_model_dir(root / "lean", "tiny-leanbert", seed=2)}


def test_top1_accuracy_by_hand():
    cand = torch.nn.functional.normalize(torch.eye(3), dim=1)
    assert top1_accuracy(cand, cand) == 1.0
    assert top1_accuracy(cand[[1, 0, 2]], cand) == pytest.approx(1 / 3)


def test_layer_choice_follows_xtreme():
    assert pick_layer("xtreme", 12) == 8 and pick_layer("last", 12) == 12 and pick_layer("xtreme", 2) == 1
    with pytest.raises(ValueError):
        pick_layer("13", 12)


def test_pairs_skip_repeated_and_short_texts():
    cfg = RetrievalConfig(min_chars=5, max_pairs=2)
    pairs = [("same text", "x one!"), ("same text", "x two!"), ("unique a", "y"), ("unique b", "zzzzzz"),
             ("unique c", "wwwwww"), ("unique d", "vvvvvv")]
    kept = select_pairs(pairs, cfg)
    assert len(kept) == 2 and all(p.startswith("unique") and len(x) >= 5 for p, x in kept)


def test_same_text_on_both_sides_is_perfect_and_a_permutation_is_not(models, tmp_path):
    en = sentences(40)
    perm = list(range(40))
    random.Random(3).shuffle(perm)
    num_fixed = sum(i == j for i, j in enumerate(perm))
    heldout = write_heldout(tmp_path / "heldout", {"en": en, "fr": list(en), "de": [en[j] for j in perm]})
    out = tmp_path / "out"
    assert retrieval_main(["--models", f"base={models['base']}", f"lean={models['lean']}", "--heldout",
                           str(heldout), "--out", str(out), "--langs", "fr", "de", "--batch-size", "16"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert set(result["models"]) == {"base", "lean"} and result["langs"] == ["fr", "de"]
    for name, r in result["models"].items():
        assert r["per_lang"]["fr"]["fr->en"] == 1.0 and r["per_lang"]["fr"]["en->fr"] == 1.0
        assert r["per_lang"]["de"]["de->en"] == pytest.approx(num_fixed / 40)
        assert r["per_lang"]["de"]["num_pairs"] == 40
    assert result["models"]["base"]["layer"] == 4 and result["models"]["lean"]["layer"] == 1
    table = (out / "retrieval.md").read_text()
    assert "fr→en" in table and "| base |" in table and "100.0" in table


def test_translation_is_found_more_often_than_chance_when_sides_share_words(models, tmp_path):
    # The X side keeps half of each sentence's words: a sensible encoder finds it far above chance (1/40).
    en = sentences(40, seed=5)
    half = [" ".join(s.split()[::2]) for s in en]
    heldout = write_heldout(tmp_path / "h", {"en": en, "es": half})
    pairs = read_pairs(heldout, ["es"], RetrievalConfig())

    r = evaluate_model(models["base"], pairs, RetrievalConfig(layer="0"))
    assert r["per_lang"]["es"]["es->en"] > 0.25


def test_missing_heldout_language_is_a_clear_error(models, tmp_path, capsys):
    heldout = write_heldout(tmp_path / "h", {"en": sentences(5)})
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out",
                           str(tmp_path / "o"), "--langs", "hi"]) == 2
    assert "hi/help.txt: not found" in capsys.readouterr().err


def test_missing_heldout_directory_is_named_with_its_flag(models, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(missing), "--out",
                           str(tmp_path / "o")]) == 2
    assert f"--heldout {missing}: no such directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_directory_without_its_tokenizer_is_refused_before_any_model_runs(models, tmp_path, capsys):
    heldout = write_heldout(tmp_path / "heldout", {"en": sentences(20), "fr": sentences(20, seed=1)})
    for name, broken in broken_model_dirs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        assert retrieval_main(["--models", f"good={models['base']}", f"bad={broken}", "--heldout", str(heldout),
                               "--out", str(out), "--langs", "fr"]) == 2
        err = capsys.readouterr().err
        assert str(broken) in err and "--models bad" in err
        assert not out.exists()


def test_each_model_pooled_at_its_own_layer_and_every_layer_recorded(models, tmp_path):
    en = sentences(30, seed=7)
    heldout = write_heldout(tmp_path / "h", {"en": en, "fr": [" ".join(s.split()[::2]) for s in en]})
    out = tmp_path / "out"
    assert retrieval_main(["--models", f"base={models['base']}", f"lean={models['lean']}", "--heldout",
                           str(heldout), "--out", str(out), "--langs", "fr", "--layer-of", "base=last",
                           "--all-layers"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    base, lean = result["models"]["base"], result["models"]["lean"]
    # tiny-base has 6 layers (asked: last), tiny-leanbert 2 (the default, XTREME's round(2L/3) = 1)
    assert (base["layer"], lean["layer"]) == (6, 1)
    assert "layer last" in base["pooling"] and "layer xtreme" in lean["pooling"]
    for r in (base, lean):
        assert len(r["per_layer"]) == r["num_layers"] + 1
        assert r["per_layer"][r["layer"]] == pytest.approx(r["average"])
    # the same model pooled at one layer without --all-layers gives that layer's number
    alone = evaluate_model(models["base"], read_pairs(heldout, ["fr"], RetrievalConfig()), RetrievalConfig(),
                           layer="3")
    assert alone["layer"] == 3 and "per_layer" not in alone
    assert alone["average"] == pytest.approx(base["per_layer"][3])
    assert "best layer (avg)" in (out / "retrieval.md").read_text()


def test_layer_of_an_unknown_model_or_a_bad_layer_is_refused(models, tmp_path, capsys):
    heldout = write_heldout(tmp_path / "h", {"en": sentences(5), "fr": sentences(5)})
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out",
                           str(tmp_path / "o"), "--langs", "fr", "--layer-of", "other=last"]) == 2
    assert "--layer-of other: not among the models (base)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected 'xtreme', 'last' or a layer number"):
        pick_layer("middle", 6)


def test_any_language_code_of_the_heldout_directory(models, tmp_path, capsys):
    en = sentences(30)
    heldout = write_heldout(tmp_path / "h", {"en": en, "sw": list(en), "zh-hans": en[::-1]})
    out = tmp_path / "out"
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out),
                           "--langs", "sw,zh-hans"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert result["langs"] == ["sw", "zh-hans"] and result["models"]["base"]["per_lang"]["sw"]["sw->en"] == 1.0
    assert "zh-hans→en" in (out / "retrieval.md").read_text()
    capsys.readouterr()
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out),
                           "--langs", "yo"]) == 2
    assert f"languages in {heldout}: en sw zh-hans" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out),
                        "--langs", "SW"])
    assert "argument --langs: language code 'SW' is not of the form" in capsys.readouterr().err
    # Without --langs: every language the held-out directory aligns to English.
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out)]) == 0
    assert json.loads((out / "retrieval.json").read_text())["langs"] == ["sw", "zh-hans"]


def test_a_model_is_pooled_by_its_recorded_recipe_and_every_row_says_how_it_was_pooled(models, tmp_path):
    import transformers

    from data_prep.e5_teacher import convert
    from ds_kd.eval.retrieval import Pooling, embed, load_encoder
    from tests.helpers.q4fixture import write_q4_file

    write_q4_file(tmp_path / "tiny-q4.bin", seed=3)
    convert(tmp_path / "tiny-q4.bin", tmp_path / "e5")  # the e5 conversion records e5's recipe
    e5 = tmp_path / "e5"
    texts = ["abc ab. abc", "ab abc. ab abc", "c b a abc ab"]
    # e5's recipe by hand, through transformers: "query: " + text, mean of the last layer over the attention mask
    hf = transformers.BertModel.from_pretrained(e5, add_pooling_layer=False).eval()
    batch = transformers.AutoTokenizer.from_pretrained(e5)(["query: " + t for t in texts], padding=True,
                                                           return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    encoder, tokenizer, num_layers = load_encoder(e5)
    pooling = Pooling.of(e5, None, "xtreme")
    got = embed(encoder, tokenizer, texts, [num_layers], RetrievalConfig(), pooling=pooling)[0]
    assert pooling.layer == "last" and torch.allclose(got, want, atol=1e-5)

    en = [f"{t} {i}" for i, t in enumerate(sentences(12, seed=5))]
    heldout = write_heldout(tmp_path / "h", {"en": en, "fr": [" ".join(s.split()[::2]) for s in en]})
    out = tmp_path / "out"
    assert retrieval_main(["--models", f"e5={e5}", f"base={models['base']}", "--heldout", str(heldout), "--out",
                           str(out), "--langs", "fr"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert result["models"]["e5"]["layer"] == num_layers  # the recipe's layer, not the default --layer xtreme
    rows = {line.split(" | ")[0].strip("| "): line for line in (out / "retrieval.md").read_text().splitlines()
            if line.startswith("| e5 ") or line.startswith("| base ")}
    assert "'query: ' + text" in rows["e5"] and "[CLS]/[SEP] included" in rows["e5"] and "recipe" in rows["e5"]
    assert "the sub-word tokens, of the text as is" in rows["base"] and "recipe" not in rows["base"]


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(t + "\n" for t in lines), encoding="utf-8")


def test_line_aligned_files_one_per_language(models, tmp_path, capsys):
    """<dir>/<lang>.txt, line i of each the same sentence: the languages are found, the identical side is
    perfect, the permuted side scores its fixed points, and the unknown-token rates name the files."""
    en = sentences(30)
    perm = list(range(30))
    random.Random(4).shuffle(perm)
    heldout = tmp_path / "flores"
    heldout.mkdir()
    for lang, lines in {"en": en, "fr": list(en), "de": [en[j] for j in perm]}.items():
        write_lines(heldout / f"{lang}.txt", lines)
    write_lines(heldout / "README.txt", ["not a language"])
    out = tmp_path / "out"
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out)]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert result["langs"] == ["fr", "de"]
    scores = result["models"]["base"]["per_lang"]
    assert scores["fr"]["fr->en"] == 1.0 and scores["fr"]["num_pairs"] == 30
    assert scores["de"]["de->en"] == pytest.approx(sum(i == j for i, j in enumerate(perm)) / 30)
    assert set(result["unknown_token_rates"]["base"]) == {str(heldout / f"{lang}.txt") for lang in ("en", "fr", "de")}
    write_lines(heldout / "de.txt", en[:29])
    capsys.readouterr()
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out)]) == 2
    assert f"error: {heldout / 'de.txt'}: 29 lines for the 30 of {heldout / 'en.txt'}" in capsys.readouterr().err
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out", str(out),
                           "--langs", "hi"]) == 2
    assert f"{heldout / 'hi.txt'}: not found" in capsys.readouterr().err


def test_tatoeba_files_one_pair_each_in_xtremes_and_lasers_names(models, tmp_path):
    """Tatoeba as XTREME's download writes it (fr-en.fr, fr-en.en) and as LASER releases it (tatoeba.deu-eng.deu,
    tatoeba.deu-eng.eng): each pair has its own pivot side; the codes are those of the file names."""
    en, other = sentences(20, seed=1), sentences(25, seed=2)
    xtreme, laser = tmp_path / "xtreme", tmp_path / "laser"
    xtreme.mkdir()
    laser.mkdir()
    write_lines(xtreme / "fr-en.en", en)
    write_lines(xtreme / "fr-en.fr", list(en))
    write_lines(xtreme / "de-en.en", other)
    write_lines(xtreme / "de-en.de", other[::-1])
    write_lines(laser / "tatoeba.deu-eng.eng", other)
    write_lines(laser / "tatoeba.deu-eng.deu", other[::-1])
    out = tmp_path / "out"
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(xtreme), "--out", str(out),
                           "--min-chars", "0"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert result["langs"] == ["fr", "de"]
    scores = result["models"]["base"]["per_lang"]
    assert scores["fr"] == {"fr->en": 1.0, "en->fr": 1.0, "num_pairs": 20}
    assert scores["de"]["num_pairs"] == 25 and scores["de"]["de->en"] == pytest.approx(1 / 25)  # the middle one
    assert str(xtreme / "de-en.en") in result["unknown_token_rates"]["base"]
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(laser), "--out", str(out),
                           "--min-chars", "0", "--pivot", "eng"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert result["langs"] == ["deu"]
    assert result["models"]["base"]["per_lang"]["deu"]["deu->eng"] == scores["de"]["de->en"]


def result_of(averages: dict[str, float], num_pairs: int) -> dict:
    return {"config": {"pivot": "en"}, "langs": ["de"], "num_pairs": {"de": num_pairs},
            "models": {name: {"average": a} for name, a in averages.items()}}


def test_claims_judge_retention_and_at_least_with_the_pair_samples_error():
    from ds_kd.eval.retrieval import judge

    # 0.95 of 0.80 = 0.76: kept 95%; 0.70 is 87.5%. At 200 pairs two standard errors of 0.76 vs 0.70 are
    # 2 * sqrt((0.76 * 0.24 + 0.70 * 0.30) / 200) = 0.089: a 6-point lead cannot tell; at 2,000 pairs (0.028) agree.
    small = judge(result_of({"T": 0.80, "pair": 0.76, "multi": 0.70}, 200), {"pair": "T", "multi": "T"},
                  {"pair": "multi", "multi": "pair"})
    assert [c["verdict"] for c in small] == ["holds", "does not hold", "cannot tell", "cannot tell"]
    assert small[0]["share"] == pytest.approx(0.95) and small[2]["standard_error"] == pytest.approx(0.0443, abs=1e-4)
    large = judge(result_of({"T": 0.80, "pair": 0.76, "multi": 0.70}, 2000), {}, {"pair": "multi", "multi": "pair"})
    assert [c["verdict"] for c in large] == ["agree", "disagree"]
    assert "**agree**" in large[0]["text"] and "de→en" in large[0]["text"]


def test_claims_are_written_under_the_table_and_unknown_names_refused(models, tmp_path, capsys):
    en = sentences(30)
    heldout = write_heldout(tmp_path / "h", {"en": en, "de": list(en)})
    out = tmp_path / "o"
    assert retrieval_main(["--models", f"base={models['base']}", f"lean={models['lean']}", "--heldout", str(heldout),
                           "--out", str(out), "--langs", "de", "--retention", "lean=base", "--at-least",
                           "lean=base"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert [c["verdict"] for c in result["claims"]] == ["holds", "cannot tell"]  # both find every translation
    assert "lean keeps **100%** of base's de→en retrieval" in (out / "retrieval.md").read_text()
    assert retrieval_main(["--models", f"base={models['base']}", "--heldout", str(heldout), "--out",
                           str(tmp_path / "o2"), "--langs", "de", "--at-least", "base=other"]) == 2
    assert "--at-least other: not among the models (base)" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
