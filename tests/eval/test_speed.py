"""The speed benchmark on two tiny models: positive figures, parameter counts and the student's speed-up."""
from __future__ import annotations

import json

from tests.conftest import load_script
from tests.helpers.finetune_fixtures import broken_model_dirs, make_model_dir

speed_main = load_script("speed").main


def test_speed_of_teacher_and_student(tmp_path):
    teacher = make_model_dir(tmp_path / "teacher", "tiny-large", seed=0)
    student = make_model_dir(tmp_path / "student", "tiny-leanbert", seed=1)
    heldout = tmp_path / "heldout" / "en"
    heldout.mkdir(parents=True)
    (heldout / "help.txt").write_text("john visited paris today\nmary saw the song by ali in rome\n" * 5)
    out = tmp_path / "speed"
    assert speed_main(["--models", f"teacher={teacher}", f"student={student}", "--teacher-of", "student=teacher",
                       "--heldout", str(tmp_path / "heldout"), "--out", str(out), "--num-sentences", "8",
                       "--batch-size", "4", "--repeats", "2", "--warmup", "1", "--threads", "1"]) == 0
    result = json.loads((out / "speed.json").read_text())
    assert result["threads"] == 1 and len(result["lengths"]) == 8 and min(result["lengths"]) >= 6
    for r in result["models"].values():
        assert r["ms_per_sentence_batch1"] > 0 and r["sentences_per_s_batch4"] > 0
        assert 0 < r["num_params_without_embeddings"] < r["num_params"]
    t, s = result["models"]["teacher"], result["models"]["student"]
    assert t["num_params_without_embeddings"] > 5 * s["num_params_without_embeddings"]
    up = result["speedups"]["student"]
    assert up["teacher"] == "teacher" and up["speedup_batch1"] > 0 and up["speedup_batch4"] > 0
    assert "teacher" not in result["speedups"]
    table = (out / "speed.md").read_text()
    assert "| student |" in table and "× vs teacher" in table and "1 thread(s)" in table
    # the parameter table: the presets' shapes, and embedding + the rest = all
    assert (s["num_layers"], s["hidden_size"], s["num_heads"], s["ffn_size"]) == (2, 48, 3, 76)
    assert (t["num_layers"], t["hidden_size"], t["num_heads"], t["ffn_size"]) == (12, 64, 4, 256)
    embedding = s["num_params"] - s["num_params_without_embeddings"]
    assert (f"| student | 2 | 48 | 3 | 76 | {s['vocab_size']} | {embedding / 1e6:.2f}M | "
            f"{s['num_params_without_embeddings'] / 1e6:.2f}M | {s['num_params'] / 1e6:.2f}M |") in table
    assert (f"- student: {s['ms_per_sentence_batch1']:.1f} ms per sentence at batch 1 on this CPU, teacher: "
            f"{t['ms_per_sentence_batch1']:.1f} ms: **{up['speedup_batch1']:.1f}× faster**") in table


def test_given_lengths_and_bad_teacher_name(tmp_path, capsys):
    model = make_model_dir(tmp_path / "m", "tiny-leanbert")
    out = tmp_path / "speed"
    assert speed_main(["--models", f"m={model}", "--lengths", "5", "9", "17", "--out", str(out), "--repeats", "1",
                       "--warmup", "0", "--batch-size", "2"]) == 0
    assert json.loads((out / "speed.json").read_text())["lengths"] == [5, 9, 17]
    assert speed_main(["--models", f"m={model}", "--lengths", "5", "--out", str(out), "--teacher-of", "m=nobody",
                       "--repeats", "1"]) == 2
    assert "no model named 'nobody'" in capsys.readouterr().err


def test_model_directory_without_its_tokenizer_is_refused(tmp_path, capsys):
    for name, broken in broken_model_dirs(tmp_path).items():
        out = tmp_path / f"speed-{name}"
        assert speed_main(["--models", f"m={broken}", "--lengths", "5", "--out", str(out), "--repeats", "1",
                           "--warmup", "0"]) == 2
        err = capsys.readouterr().err
        assert str(broken) in err and ("no tokenizer files" in err if name == "bare" else "20 rows" in err)
        assert not out.exists()
