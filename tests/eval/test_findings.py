"""The paper's findings judged from given zero-shot numbers: agree, disagree or cannot tell, never a claim
stronger than the seeds' spread (a difference within 2 sample std of either row cannot be told)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script
from ds_kd.eval.findings import AGREE, CANNOT_TELL, DISAGREE, MIXED, Comparison, compare, default_comparisons, judge
from ds_kd.data.tasks import TASKS, zero_shot_langs

report_main = load_script("report").main


@pytest.mark.parametrize("expected, other, verdict", [
    ([70.0, 72.0, 71.0], [60.0, 61.0, 59.0], AGREE),          # ahead by 11, std 1: agree
    ([60.0, 61.0, 59.0], [70.0, 72.0, 71.0], DISAGREE),       # behind by as much: disagree
    ([70.0, 74.0], [68.0, 69.0], CANNOT_TELL),                # +3.5, std 2.83 -> margin 5.66: cannot tell
    ([70.0, 71.0], [60.0, 70.0], CANNOT_TELL),                # +5.5 but the other row's std 7.07: cannot tell
    ([70.0, 71.0], [66.0, 66.5], AGREE),                      # +4.25 > 2 x 0.707
    ([90.0], [10.0, 11.0], CANNOT_TELL),                      # one seed: no spread, no verdict
    ([50.0, 50.0], [50.0, 50.0], CANNOT_TELL),                # equal
])
def test_verdict_of_one_task(expected, other, verdict):
    assert compare(expected, other) == verdict


def test_findings_from_a_table_of_numbers():
    zero_shot = {  # row -> task -> seeds' zero-shot averages (percent)
        "KD": {"xnli": [70.0, 71.0, 72.0], "pawsx": [60.0, 62.0, 64.0]},
        "Vanilla": {"xnli": [50.0, 51.0, 52.0], "pawsx": [61.0, 62.0, 63.0]},
        "KD (ft-distill)": {"xnli": [60.0, 61.0, 62.0], "pawsx": [70.0, 71.0, 72.0]},
        "Big-teacher student": {"xnli": [71.0], "pawsx": [62.0]},
    }
    comparisons = [Comparison(1, "KD", "Vanilla"), Comparison(2, "KD", "KD (ft-distill)"),
                   Comparison(3, "Big-teacher student", "KD")]
    one, two, three = judge(comparisons, zero_shot)
    # (1) xnli +20 with std 1: agree; pawsx +-0 within the spread: cannot tell -> the finding agrees
    assert [v.verdict for _, vs in one.comparisons for v in vs] == [AGREE, CANNOT_TELL]
    assert one.verdict == AGREE and one.counts == {AGREE: 1, DISAGREE: 0, CANNOT_TELL: 1}
    # (2) plain beats ft-distill on xnli (agrees: KD in fine-tuning hurt) but loses on pawsx: mixed
    assert [v.verdict for _, vs in two.comparisons for v in vs] == [AGREE, DISAGREE] and two.verdict == MIXED
    # (3) one seed of the larger teacher's student: cannot tell anywhere, whatever the difference
    assert three.verdict == CANNOT_TELL and three.counts[CANNOT_TELL] == 2
    assert one.comparisons[0][1][0].difference == pytest.approx(20.0)


def test_rows_without_results_or_with_other_settings_are_not_compared():
    zero_shot = {"A": {"xnli": [70.0, 71.0]}, "B": {"xnli": [10.0, 11.0]}}
    (one, two, three) = judge([Comparison(1, "A", "missing"), Comparison(2, "A", "B")], zero_shot,
                              settings={"A": (3, 1e-3), "B": (1, 1e-3)})
    assert one.verdict == CANNOT_TELL and one.untested[0][1].startswith("no zero-shot results")
    assert two.verdict == CANNOT_TELL and two.untested[0][1] == "fine-tuned with different settings"
    assert not three.comparisons and not three.untested
    with pytest.raises(ValueError, match="finding 4"):
        judge([Comparison(4, "A", "B")], zero_shot)


def test_default_comparisons_are_the_papers_among_rows_present():
    rows = ["mBERT8", "Vanilla mLeanBERT", "mLeanBERT", "mXLeanBERT", "mLeanBERT (ft-distill)"]
    got = [(c.finding, c.expected, c.other) for c in default_comparisons(rows, {"mLeanBERT (ft-distill)": "mLeanBERT"})]
    assert got == [(1, "mLeanBERT", "Vanilla mLeanBERT"), (1, "mXLeanBERT", "Vanilla mLeanBERT"),
                   (2, "mLeanBERT", "mLeanBERT (ft-distill)"), (3, "mXLeanBERT", "mLeanBERT")]
    assert default_comparisons(["mLeanBERT", "other"], {}) == []


def write_job(root: Path, model: str, task: str, seed: int, zero_shot: float, epochs: int = 3) -> None:
    spec = TASKS[task]
    langs = zero_shot_langs(spec)
    result = {"task": task, "model": model, "seed": seed, "metric": spec.metric, "en": 0.9,
              "scores": {lang: {spec.metric: zero_shot} for lang in ["en", *langs]},
              "zero_shot_avg": zero_shot, "zero_shot_langs": langs, "config": {"epochs": epochs, "lr": 1e-4}}
    out = root / "jobs" / model.replace(" ", "_") / task / f"seed{seed}"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(result))


def test_report_states_each_finding_with_the_spread(tmp_path):
    grid = tmp_path / "grid"
    for seed, (kd, vanilla, other) in enumerate([(0.70, 0.50, 0.69), (0.72, 0.51, 0.75)], 1):
        write_job(grid, "mLeanBERT", "xnli", seed, kd)
        write_job(grid, "Vanilla mLeanBERT", "xnli", seed, vanilla)
        write_job(grid, "e5 student", "xnli", seed, other)
        write_job(grid, "e5 vanilla", "xnli", seed, vanilla, epochs=1)
    assert report_main([str(grid), "--out", str(tmp_path / "r"), "--finding", "1", "e5 student=mLeanBERT",
                        "e5 student=e5 vanilla"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "**Finding (1): KD during pretraining helps zero-shot transfer over Vanilla.** These runs: **agree** " \
           "(1 task comparison(s) agree, 0 disagree, 1 cannot tell)." in text
    # mLeanBERT 71.0 ± 1.4 vs Vanilla 50.5 ± 0.7: +20.5 > 2 x 1.41
    assert "| mLeanBERT | Vanilla mLeanBERT | XNLI | 71.0 ± 1.4 (n=2) | 50.5 ± 0.7 (n=2) | +20.5 | agree |" in text
    # e5 student 72.0 ± 4.2 vs mLeanBERT: +1.0, within the spread
    assert "| e5 student | mLeanBERT | XNLI | 72.0 ± 4.2 (n=2) | 71.0 ± 1.4 (n=2) | +1.0 | cannot tell |" in text
    assert "Not compared: e5 student vs e5 vanilla (fine-tuned with different settings)." in text
    assert "### Fine-tuning settings per row" in text
    assert "**Finding (2): KD during fine-tuning can hurt zero-shot transfer.** These runs: **cannot tell**" in text
    assert "No pair of rows in this grid tests it." in text


def test_bad_finding_flags_are_refused(tmp_path, capsys):
    for args in (["--finding", "4", "a=b"], ["--finding", "1"], ["--finding", "1", "ab"]):
        with pytest.raises(SystemExit):
            report_main([str(tmp_path), *args])
        assert "--finding" in capsys.readouterr().err


def test_ablations_are_judged_on_english_and_zero_shot_whatever_their_settings(tmp_path, capsys):
    """--ablation MAIN=ABLATION: the main row expected ahead, per task, on English and on the zero-shot average,
    with the findings' rule; other fine-tuning settings do not stop the comparison (an ablation differs by
    design); a row name not in the grid is refused naming it."""
    grid = tmp_path / "grid"

    def job(model, seed, en, zero_shot, epochs=3):
        write_job(grid, model, "wikiann", seed, zero_shot, epochs)
        path = grid / "jobs" / model.replace(" ", "_") / "wikiann" / f"seed{seed}" / "result.json"
        result = json.loads(path.read_text())
        result["en"] = result["scores"]["en"]["f1"] = en
        path.write_text(json.dumps(result))

    for seed, (main_en, main_zs, abl_en, abl_zs, one_en) in enumerate(
            [(0.80, 0.66, 0.60, 0.65, 0.90), (0.78, 0.70, 0.62, 0.71, 0.91)], 1):
        job("XD", seed, main_en, main_zs)
        job("XD, labels only", seed, abl_en, abl_zs, epochs=1)  # other settings: still compared
        if seed == 1:
            job("XD, one seed", seed, one_en, 0.1)
    assert report_main([str(grid), "--out", str(tmp_path / "r"), "--ablation", "XD=XD, labels only",
                        "--ablation", "XD=XD, one seed"]) == 0  # repeated: both kept
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## What each ingredient adds (ablations)" in text
    # English: 79.0 ± 1.4 vs 61.0 ± 1.4, +18.0 > 2 x 1.41: agree; zero-shot 68.0 ± 2.8 vs 68.0 ± 4.2: cannot tell
    assert "| XD | XD, labels only | WikiANN | English | 79.0 ± 1.4 (n=2) | 61.0 ± 1.4 (n=2) | +18.0 | agree |" in text
    assert "| XD | XD, labels only | WikiANN | zero-shot | 68.0 ± 2.8 (n=2) | 68.0 ± 4.2 (n=2) | +0.0 | cannot tell |" \
        in text
    # a single seed of the ablation: cannot tell, even 11 points behind
    assert "| XD | XD, one seed | WikiANN | English | 79.0 ± 1.4 (n=2) | 90.0 (n=1) | -11.0 | cannot tell |" in text
    assert report_main([str(grid), "--out", str(tmp_path / "r2"), "--ablation", "XD=XD, typo"]) == 2
    assert "--ablation XD=XD, typo: no row named 'XD, typo'" in capsys.readouterr().err
