"""BiStil's phase 1 (``launch/distill.py --recipe bistil``) on 2 ranks through the real ``deepspeed`` launcher."""
from __future__ import annotations

import json

from ds_kd.distill.bistil import PROJECTION_FILE
from tests.conftest import deepspeed_cmd, run_cmd, tail
from tests.distill.test_distill_launch import distill_args, step_metrics, teacher  # noqa: F401 (a fixture)

GLOBAL_BATCH = 16  # 2 ranks x micro batch 8


def test_bistil_phase_1_on_two_ranks_and_its_fixed_projection_on_resume(tiny_corpus, teacher, tmp_path):  # noqa: F811
    out = tmp_path / "bistil"
    args = distill_args(tiny_corpus, teacher, out, "zero2", "--recipe", "bistil", "--student", "tiny-base",
                        "--projection-sentences", "40")
    proc = run_cmd(deepspeed_cmd("launch/distill.py", args))
    assert proc.returncode == 0, tail(proc)
    manifest = json.loads((out / "manifest.json").read_text())
    summary = manifest["distillation"]
    assert summary["layer_map"] == [2, 4, 6, 8, 10, 12]  # 12 -> 6 (tiny-base): every other teacher layer
    assert summary["projections"] == [f"fixed: teacher hidden state {g}" for g in (0, 2, 4, 6, 8, 10, 12)]
    assert summary["config"]["attention_target"] == "probabilities"
    assert manifest["init"] == {"word_embeddings": "svd of the teacher's, rank 48"}
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["hidden_dropout_prob"] == 0.0
    assert config["attention_probs_dropout_prob"] == 0.0
    steps = step_metrics(out)
    assert {k for k in steps[1] if k.startswith("loss_")} - {"loss_scale"} == {"loss_hidden", "loss_attention"}
    counts = {lang: steps[10][f"sentences_{lang}"] for lang in ("en", "fr", "hi")}
    # three languages in turn, one global batch each: after 10 steps 4 + 3 + 3 batches
    assert sorted(counts.values()) == [3 * GLOBAL_BATCH, 3 * GLOBAL_BATCH, 4 * GLOBAL_BATCH]
    assert sum(steps[s]["loss"] for s in (8, 9, 10)) < sum(steps[s]["loss"] for s in (1, 2, 3))
    saved = (out / PROJECTION_FILE).read_bytes()
    assert manifest["fixed_projection"]["file"] == PROJECTION_FILE

    longer = args[:args.index("--max-steps") + 1] + ["14"] + args[args.index("--max-steps") + 2:] + ["--resume"]
    proc = run_cmd(deepspeed_cmd("launch/distill.py", longer))
    assert proc.returncode == 0, tail(proc)
    assert "written when the run started" in proc.stdout + proc.stderr  # read back, not fitted again
    assert (out / PROJECTION_FILE).read_bytes() == saved
    resumed = json.loads((out / "manifest.json").read_text())
    assert resumed["steps"] == 14 and resumed["fixed_projection"] == manifest["fixed_projection"]
