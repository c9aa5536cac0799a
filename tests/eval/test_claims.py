"""The recipes' claims on fine-tuned rows (``launch/report.py --retention/--within``) and LT-SFT's K check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script
from ds_kd.errors import UsageError
from ds_kd.eval.claims import Claim, judge_claims, sparse_checks
from ds_kd.eval.report import collect, write_report


def write(grid: Path, model: str, seed: int, f1: dict[str, float], zero_shot: list[str], sparse: dict | None = None):
    out = grid / "jobs" / model.replace(" ", "_") / "wikiann" / f"seed{seed}"
    out.mkdir(parents=True)
    result = {"task": "wikiann", "model": model, "seed": seed, "metric": "f1", "en": f1["en"],
              "scores": {lang: {"f1": v} for lang, v in f1.items()}, "zero_shot_langs": zero_shot,
              "zero_shot_avg": sum(f1[lang] for lang in zero_shot) / len(zero_shot), "sparse": sparse}
    (out / "result.json").write_text(json.dumps(result))


@pytest.fixture
def grid(tmp_path) -> Path:
    """A multilingual teacher tested on fr, de and ja; a pair student (en-de) with two seeds tested on de only; its
    dense twin; the student's LT-SFT facts (one job over its K)."""
    root = tmp_path / "grid"
    write(root, "teacher", 1, {"en": 0.80, "fr": 0.90, "de": 0.50, "ja": 0.70}, ["fr", "de", "ja"])
    for seed, de in ((1, 0.455), (2, 0.465)):  # 46.0 on de: 92% of the teacher's 50.0, 66% of its 70.0 average
        write(root, "pair", seed, {"en": 0.7, "de": de}, ["de"],
              {"k": 80, "num_body_weights": 1000, "num_changed_body_weights": 80 if seed == 1 else 81,
               "density": 0.08})
    write(root, "pair, dense", 1, {"en": 0.7, "de": 0.471}, ["de"])  # 47.1: the pair is 1.1 points below
    write(root, "pair, dense b", 1, {"en": 0.7, "de": 0.469}, ["de"])  # 46.9: 0.9 points below
    return root


def test_claims_compare_on_the_claiming_rows_own_zero_shot_languages(grid):
    retention, within, close = judge_claims([Claim("retention", "pair", "teacher"), Claim("within", "pair", "pair, dense"),
                                             Claim("within", "pair", "pair, dense b")], collect(grid))
    assert retention.langs == ["de"] and retention.task == "wikiann"
    assert retention.row_scores == pytest.approx([45.5, 46.5]) and retention.reference_scores == pytest.approx([50.0])
    assert retention.holds  # 92% on German; against the teacher's zero-shot average (70.0) it would be 66%
    assert within.holds is False and close.holds is True  # 1.1 points below: no; 0.9: yes


def test_report_states_each_claim_and_every_ltsft_jobs_changed_weights(grid, tmp_path):
    report = write_report(grid, tmp_path / "r", claims=[Claim("retention", "pair", "teacher"),
                                                        Claim("within", "pair", "pair, dense")])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## The recipes' claims against these runs" in md
    assert "| pair keeps at least 90% of teacher's score | wikiann | de | 46.0 ± 0.7 (n=2) | 50.0 (n=1) | 92% | -4.0 " \
           "| **holds** |" in md
    assert "| pair is within 1 point of pair, dense | wikiann | de | 46.0 ± 0.7 (n=2) | 47.1 (n=1) | 98% | -1.1 | " \
           "**does not hold** |" in md
    assert [(c.seed, c.changed, c.k, c.holds) for c in report.sparse] == [(1, 80, 80, True), (2, 81, 80, False)]
    assert "| pair | wikiann | 2 | 81 | 80 | 1,000 | 0.08 | **no** |" in md
    assert sparse_checks(collect(grid)) == report.sparse


def test_a_claim_naming_no_row_is_refused_naming_the_flag(grid, tmp_path, capsys):
    with pytest.raises(UsageError, match=r"--within pair=pair dense: no row named 'pair dense'"):
        judge_claims([Claim("within", "pair", "pair dense")], collect(grid))
    report = load_script("report")
    assert report.main([str(grid), "--out", str(tmp_path / "r"), "--retention", "pair=teachr"]) == 2
    assert "--retention pair=teachr: no row named 'teachr'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a refused report leaves no folder
    assert report.main([str(grid), "--out", str(tmp_path / "r"), "--retention", "pair=teacher"]) == 0
    assert "**holds**" in (tmp_path / "r" / "report.md").read_text()
