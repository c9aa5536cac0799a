"""User errors (UsageError) end a command with one line; every other exception, a plain ValueError included,
keeps its traceback so that a bug is not mistaken for bad input."""
from __future__ import annotations

import importlib
import json
import logging
import traceback

import pytest

from tests.conftest import load_script
from ds_kd.cli import main_guard
from ds_kd.errors import UsageError


def _deep_bug():
    raise ValueError("bug: an internal invariant broke")


def test_main_guard_lets_a_bug_keep_its_traceback():
    with pytest.raises(ValueError, match="internal invariant") as raised:
        main_guard(lambda: _deep_bug())
    assert "_deep_bug" in "".join(traceback.format_tb(raised.tb))  # the frame that raised it is shown


def test_main_guard_prints_a_usage_error_as_one_line(caplog):
    def bad_flag():
        raise UsageError("--max-len must be positive, got 0")

    with caplog.at_level(logging.ERROR, logger="ds_kd"):
        assert main_guard(bad_flag) == 2
    assert [r.getMessage() for r in caplog.records] == ["--max-len must be positive, got 0"]
    assert not any(r.exc_info for r in caplog.records)


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)  # callers and tests catching ValueError keep working


def _model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return str(tmp_path / "m")


# command -> (module, or launch script name with a "launch/" prefix; the name its main() calls inside the guard;
# the command line, given tmp_path)
COMMANDS = {
    "corpus": ("data_prep.corpus", "run", lambda t: ["--raw", str(t), "--out", str(t / "o")]),
    "libreoffice": ("data_prep.libreoffice", "fetch", lambda t: ["--raw", str(t)]),
    "demo_tasks": ("data_prep.demo_tasks", "build_tasks", lambda t: ["--heldout", str(t), "--out", str(t / "o")]),
    "e5_teacher": ("data_prep.e5_teacher", "build", lambda t: ["--out", str(t / "o")]),
    "trim_vocab": ("data_prep.trim_vocab", "trim", lambda t: ["--model", str(t), "--corpus", str(t), "--out", "o"]),
    "verify": ("ds_kd.data.shards", "verify_shards", lambda t: ["--shards", str(t)]),
    "tasks": ("data_prep.tasks.cli", "prepare_task", lambda t: ["--task", "xnli", "--src", str(t), "--out",
                                                                  str(t / "o")]),
    "speed": ("launch/speed", "run", lambda t: ["--models", f"a={_model_dir(t)}", "--lengths", "5", "--out",
                                                str(t / "o")]),
    "retrieval": ("launch/retrieval", "run", lambda t: ["--models", f"a={_model_dir(t)}", "--heldout", str(t),
                                                        "--langs", "fr", "--out", str(t / "o")]),
    "grid": ("launch/grid", "run_grid", lambda t: ["--models", f"a={t}", "--data", str(t), "--tasks", "xnli",
                                                   "--out", str(t / "o")]),
    "finetune": ("ds_kd.finetune.job", "run", lambda t: ["--model", _model_dir(t), "--task", "xnli", "--data", str(t),
                                                      "--out", str(t / "o")]),
}
MAINS = {"verify": "data_prep.verify",  # where main() is when the patched name lives elsewhere
         "finetune": "launch/finetune"}  # (it imports ``run`` after parsing, so that --help needs no torch)


def _load(module: str):
    return load_script(module.removeprefix("launch/")) if module.startswith("launch/") else \
        importlib.import_module(module)


def _command(name):
    module, attr, argv = COMMANDS[name]
    owner = _load(module)
    main = _load(MAINS[name]).main if name in MAINS else owner.main
    return owner, attr, argv, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_bug_in_a_command_keeps_its_traceback(name, tmp_path, monkeypatch):
    owner, attr, argv, main = _command(name)
    monkeypatch.setattr(owner, attr, lambda *a, **k: _deep_bug())
    with pytest.raises(ValueError, match="internal invariant"):
        main(argv(tmp_path))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_usage_error_in_a_command_is_one_line(name, tmp_path, monkeypatch, capsys):
    owner, attr, argv, main = _command(name)

    def refuse(*a, **k):
        raise UsageError(f"{tmp_path}/input.tsv: bad header; fix the file")

    monkeypatch.setattr(owner, attr, refuse)
    assert main(argv(tmp_path)) == 2  # argparse's status for bad input, and every command's
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"{tmp_path}/input.tsv: bad header; fix the file"), lines


def test_report_finding_errors_name_the_flag_and_bugs_propagate(monkeypatch, capsys):
    report = load_script("report")
    with pytest.raises(SystemExit) as stop:
        report.main(["grid", "--finding", "9", "a=b"])
    assert stop.value.code == 2
    assert "--finding 9: the paper's findings are 1, 2, 3" in capsys.readouterr().err
    monkeypatch.setattr(report, "parse_findings", lambda groups: _deep_bug())
    with pytest.raises(ValueError, match="internal invariant"):
        report.main(["grid"])


# ---- converted raises: representative user errors reach the command line as one line ------------------------

def test_bad_flags_and_files_are_usage_errors(tmp_path, caplog):
    from ds_kd.train.engine import load_ds_config, parse_override
    from ds_kd.models.warmstart import student_config

    bad_json = tmp_path / "zero2.json"
    bad_json.write_text("{\"train_batch_size\": }")
    cases = [(lambda: load_ds_config(bad_json), f"{bad_json}:1: not valid JSON"),
             (lambda: parse_override("zero_optimization.stage"), "is not KEY=VALUE"),
             (lambda: student_config("from-init", 100), "takes the shape of --init-from, which is not given")]
    for call, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="ds_kd"):
            assert main_guard(call) == 2
        assert len(caplog.records) == 1 and message in caplog.records[0].getMessage()


def test_train_flag_errors_are_usage_errors(tmp_path):
    from ds_kd.train.training import TrainConfig, check_train_flags

    cfg = TrainConfig(deepspeed_config="ds.json", data=str(tmp_path), out=str(tmp_path / "o"), max_steps=10,
                      max_len=0)
    with pytest.raises(UsageError, match="--max-len must be positive"):
        check_train_flags(cfg)


def test_grid_rows_and_task_files_raise_usage_errors(tmp_path):
    from data_prep.tasks.taskdata import TaskDataError
    from ds_kd.eval.grid import build_rows

    with pytest.raises(UsageError, match="given twice in --models"):
        build_rows([("a", "x"), ("a", "y")])
    assert issubclass(TaskDataError, UsageError)  # a task file in the wrong format is the user's to fix
    path = tmp_path / "result.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"model": "m"}))
    from ds_kd.eval.report import collect

    with pytest.raises(UsageError, match="not a fine-tuning result.json"):
        collect(tmp_path)


def test_finetune_settings_refused_as_the_config_is_built_are_one_line_naming_the_flag(tmp_path, capsys):
    finetune = load_script("finetune")
    assert finetune.main(["--model", _model_dir(tmp_path), "--task", "xnli", "--data", str(tmp_path), "--out",
                          str(tmp_path / "o"), "--max-len", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: --max-len must be at least 8 sub-words, got 0"]


def test_a_run_directory_given_as_a_model_points_at_its_export(tmp_path):
    from ds_kd.models.modeldir import read_config

    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "export" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"run: not a model directory: it is a training run's directory; "
                                                r"its model is .*run/export"):
        read_config(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"nothing: not a model directory \(no config.json\)"):
        read_config(tmp_path / "nothing")


@pytest.mark.parametrize("script", ["speed", "retrieval"])
def test_a_models_entry_without_a_checkpoint_exits_2_naming_the_flag_and_the_model(script, tmp_path, capsys):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "help.txt").write_text("Open a file.\n")
    argv = ["--models", f"student={tmp_path / 'missing'}", "--out", str(tmp_path / "o"), "--heldout", str(tmp_path),
            *(["--langs", "fr"] if script == "retrieval" else [])]
    assert load_script(script).main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --models student={tmp_path / 'missing'}: not a model directory (no config.json)"], lines
    (tmp_path / "run" / "export").mkdir(parents=True)  # a training run's directory: its model is export/
    (tmp_path / "run" / "export" / "config.json").write_text("{}")
    argv[1] = f"student={tmp_path / 'run'}"
    assert load_script(script).main(argv) == 2
    assert f"its model is {tmp_path / 'run' / 'export'}" in capsys.readouterr().err


def test_finetune_names_the_flag_of_a_missing_model_or_teacher(tmp_path, capsys):
    finetune = load_script("finetune")
    base = ["--task", "wikiann", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert finetune.main(["--model", str(tmp_path / "none"), *base]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --model {tmp_path / 'none'}: not a model directory (no config.json)"]
    assert finetune.main(["--model", _model_dir(tmp_path), "--teacher", str(tmp_path / "t"), *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --teacher {tmp_path / 't'}: no fine-tuned teacher here"), err
