"""XtremeDistil (``ds_kd.finetune.xtremedistil``, ``ds_kd.finetune.xtremedistil_run``, ``launch/task_distill.py``):
the recipe's pieces on tensors, and tiny runs on the generated corpus with a tiny tagging teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import deepspeed_cmd, load_script, run_cmd, tail
from tests.helpers.finetune_fixtures import write_task_data


# -- the pieces ------------------------------------------------------------------------------------------------

def test_pca_embeddings_are_a_centred_svd_up_to_sign_and_deterministic():
    from ds_kd.errors import UsageError
    from ds_kd.finetune.xtremedistil import pca_embeddings

    weight = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = pca_embeddings(weight, 6)
    assert out.shape == (50, 6) and out.dtype == weight.dtype
    centred = weight.double() - weight.double().mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    expected = u[:, :6] * s[:6]  # the scores on the 6 leading components
    signs = torch.sign((out.double() * expected).sum(0))
    torch.testing.assert_close(out.double(), expected * signs, atol=1e-5, rtol=1e-5)
    assert torch.equal(out, pca_embeddings(weight.clone(), 6))
    with pytest.raises(UsageError, match="width"):
        pca_embeddings(weight, 17)


def test_layer_maps_top_aligned_uniform_and_a_shallower_teacher_refused():
    from ds_kd.errors import UsageError
    from ds_kd.finetune.xtremedistil import layer_map

    assert layer_map(12, 4, "top") == [8, 9, 10, 11, 12]
    assert layer_map(12, 4, "uniform") == [0, 3, 6, 9, 12]
    assert layer_map(4, 4, "top") == [0, 1, 2, 3, 4]
    with pytest.raises(UsageError, match="fewer than the student"):
        layer_map(3, 4, "top")
    with pytest.raises(UsageError, match="not a multiple"):
        layer_map(12, 5, "uniform")


def test_tasks_without_one_logits_entry_are_refused_by_name():
    from ds_kd.errors import UsageError
    from ds_kd.finetune.config import TaskDistillConfig

    for task in ("matis", "mtop"):
        with pytest.raises(UsageError, match=f"--task {task}: not supported by XtremeDistil"):
            TaskDistillConfig(teacher="t", transfer="c", task=task, data="d", out="o")


def own_task_data(root: Path, name: str, kind: str, langs: list[str], **sizes) -> Path:
    """Task data under ``root`` as ``python -m data_prep tasks --task own`` writes it: its manifest names the kind."""
    from ds_kd.manifest import write_manifest

    write_task_data(root, name, kind, langs, **sizes)
    write_manifest(root / name, "tasks", task=name, kind=kind)
    return root


def test_the_task_is_a_distilled_benchmark_or_a_task_of_ones_own_under_data(tmp_path, caplog):
    from ds_kd.errors import UsageError
    from ds_kd.finetune.config import TaskDistillConfig

    data = write_task_data(tmp_path / "tasks", "wikiann", "tagging", ["en"])
    write_task_data(data, "mtop", "parse", ["en"])
    own_task_data(data, "mood", "pair", ["en"])
    own_task_data(data, "ner", "tagging", ["en"])
    script = load_script("task_distill")
    flags = ["--teacher", "t", "--transfer", "c", "--data", str(data), "--out", str(tmp_path / "o")]
    assert script.build_parser().parse_args([*flags, "--task", "mood"]).task == "mood"  # argparse lets it through
    for task in ("mood", "ner", "wikiann", "xnli"):
        assert TaskDistillConfig(teacher="t", transfer="c", task=task, data=str(data), out="o").task == task
    with pytest.raises(UsageError) as unknown:
        TaskDistillConfig(teacher="t", transfer="c", task="moood", data=str(data), out="o")
    assert f"--task moood: neither a benchmark XtremeDistil takes (xnli, pawsx, wikiann) nor a task of one's own " \
           f"under --data {data}" in str(unknown.value)
    assert "the tasks there it takes: wikiann, mood, ner " in str(unknown.value)  # not mtop
    assert script.main([*flags, "--task", "mtop"]) == 2
    assert "--task mtop: not supported by XtremeDistil" in caplog.text


def tiny_student(layers: int = 2):
    from ds_kd.finetune.data import TaskLabels
    from ds_kd.finetune.heads import TaskModel
    from ds_kd.models.model import BertModel, make_config

    labels = TaskLabels(tags=("O", "B-PER", "I-PER"))
    return TaskModel(BertModel(make_config("tiny-leanbert", vocab_size=40, num_hidden_layers=layers)), "tagging",
                     labels)


@pytest.mark.parametrize("frozen", [False, True])
def test_the_trainable_set_of_every_sub_stage(frozen):
    from ds_kd.finetune.xtremedistil import schedule, set_trainable

    student = tiny_student(2)
    plan = schedule(2, freeze_embeddings=frozen)
    emb = [] if frozen else ["embeddings"]
    unfreeze = [["head"], ["head", "layer_2"], ["head", "layer_2", "layer_1"]]
    unfreeze += [] if frozen else [["head", "layer_2", "layer_1", "embeddings"]]
    assert [(s.stage, list(s.groups)) for s in plan] == (
        [("represent", ["layer_2", "layer_1", *emb])] + [("logits", g) for g in unfreeze]
        + [("labels", g) for g in unfreeze])
    prefixes = {"head": ("tagger.",), "layer_2": ("encoder.encoder.layer.1.",),
                "layer_1": ("encoder.encoder.layer.0.",), "embeddings": ("encoder.embeddings.",)}
    for sub in plan:
        set_trainable(student, sub.groups)
        trainable = {n for n, p in student.named_parameters() if p.requires_grad}
        expected = {n for n, _ in student.named_parameters()
                    if any(n.startswith(pre) for g in sub.groups for pre in prefixes[g])}
        assert trainable == expected and trainable, sub.name


def test_the_logit_loss_counts_real_tokens_only_padded_and_packed():
    from ds_kd.finetune.xtremedistil import logit_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    real = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]]).bool()
    noisy_s, noisy_t = student.clone(), teacher.clone()
    noisy_s[~real], noisy_t[~real] = 1e6, float("nan")  # padding must reach neither the loss nor its mean
    expected = sum(((student[b, :n] - teacher[b, :n]) ** 2).sum() for b, n in ((0, 3), (1, 5))) / (8 * 3)
    torch.testing.assert_close(logit_loss(noisy_s, noisy_t, real), expected)
    soft = logit_loss(noisy_s, noisy_t, real, temperature=2.0)
    assert torch.isfinite(soft)

    # packed rows give exactly the loss of one sentence per row (the student and teacher are real task models)
    model_s, model_t = tiny_student(2).eval(), tiny_student(3).eval()
    lengths = [4, 6, 3]
    sentences = [torch.randint(5, 40, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    padded = torch.zeros(3, 6, dtype=torch.long)
    for i, s in enumerate(sentences):
        padded[i, : len(s)] = s
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
    packed = torch.cat(sentences)[None]
    sequence_ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]

    def loss(**batch):
        with torch.no_grad():
            return logit_loss(model_s(**batch).logits["tags"], model_t(**batch).logits["tags"],
                              batch["attention_mask"].bool())

    unpacked = loss(input_ids=padded, attention_mask=mask)
    packed_loss = loss(input_ids=packed, attention_mask=torch.ones_like(packed), sequence_ids=sequence_ids,
                       position_ids=positions)
    torch.testing.assert_close(packed_loss, unpacked, atol=1e-6, rtol=1e-5)


# -- tiny runs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xd_inputs(tiny_corpus, tmp_path_factory):
    """Tiny tagging and sentence-pair teachers (6 layers, width 48) on the corpus's tokenizer, their task data, a
    student config of width 32; no dropout in the student's encoder or in the head it takes from its teacher, so
    that runs on any number of ranks compare exactly."""
    from ds_kd.finetune.data import build_labels
    from ds_kd.finetune.heads import TaskModel, save_task_model
    from ds_kd.models.model import BertConfig, BertModel, make_config
    from ds_kd.data.tasks import load_split
    from ds_kd.data.tokenizer_files import load_pretrained
    from ds_kd.train.training import resolve_data

    root = tmp_path_factory.mktemp("xd")
    corpus = resolve_data(tiny_corpus, None)
    tokenizer = load_pretrained(corpus.tokenizer_dir)
    for task, kind, teacher in (("wikiann", "tagging", "teacher"), ("xnli", "pair", "pair-teacher")):
        data = write_task_data(root / "tasks", task, kind, ["en", "fr", "de"], num_train=24, num_eval=8)
        labels = build_labels(kind, load_split(data, task, "train", "en"))
        torch.manual_seed(3)
        encoder = BertModel(make_config("tiny-base", vocab_size=corpus.vocab_size,
                                        pad_token_id=corpus.special_ids["pad"]))
        save_task_model(TaskModel(encoder, kind, labels, dropout=0.0, segment_ids_trained=False), root / teacher,
                        tokenizer, task=task)
    student = BertConfig(vocab_size=corpus.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    (root / "student.json").write_text(json.dumps(student.to_hf_dict()))
    return {"teacher": str(root / "teacher"), "transfer": str(tiny_corpus), "data": str(data),
            "student": str(root / "student.json"), "root": root}


def config(inputs, out, **kw):
    from ds_kd.finetune.config import TaskDistillConfig

    base = dict(teacher=inputs["teacher"], transfer=inputs["transfer"], task="wikiann", data=inputs["data"],
                out=str(out), student=inputs["student"], transfer_batch=4, label_batch=4, represent_steps=3,
                logits_steps=2, labels_steps=2, eval_every=1, patience=5, max_len=32, save_every=1, num_workers=0,
                lr=1e-3)
    return TaskDistillConfig(**{**base, **kw})


def test_a_run_reads_no_test_file_before_its_final_evaluation_and_writes_its_records(xd_inputs, tmp_path,
                                                                                      monkeypatch):
    from ds_kd.data import tasks
    from ds_kd.finetune import xtremedistil_run as xr
    from ds_kd.finetune.heads import load_task_model
    from ds_kd.finetune.xtremedistil import pca_embeddings

    events, opened = [], tasks.open_text
    monkeypatch.setattr(tasks, "open_text",
                        lambda path, *a, **k: events.append(Path(path).name) or opened(path, *a, **k))
    finish = xr.Runner.finish
    monkeypatch.setattr(xr.Runner, "finish", lambda self: events.append("FINISH") or finish(self))
    out = tmp_path / "run"
    result = xr.run(config(xd_inputs, out, freeze_embeddings=True))

    first_test = next(i for i, e in enumerate(events) if e.startswith("test."))
    assert events.index("FINISH") < first_test, events
    assert {e for e in events if e.startswith("test.")} == {"test.en.jsonl", "test.fr.jsonl", "test.de.jsonl"}
    assert set(result.scores) == {"en", "fr", "de"} and result.zero_shot_langs == ["fr", "de"]
    records = json.loads((out / "stages.json").read_text())
    assert [r["sub_stage"] for r in records] == [
        "represent:layer_2+layer_1", "logits:head", "logits:head+layer_2", "logits:head+layer_2+layer_1",
        "labels:head", "labels:head+layer_2", "labels:head+layer_2+layer_1"]
    assert [r["steps"] for r in records] == [3] + [2] * 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layer_map"] == [4, 5, 6] and len(manifest["losses"]) == 15
    assert (out / "manifest.json").stat().st_mtime_ns >= (out / "result.json").stat().st_mtime_ns
    assert not (out / "checkpoint").exists()
    # frozen embeddings: the exported student's are the teacher's PCA, bit for bit, after 15 steps
    student, _ = load_task_model(out / "model")
    teacher, _ = load_task_model(xd_inputs["teacher"])
    pca = pca_embeddings(teacher.encoder.embeddings.word_embeddings.weight.detach(), 32)
    assert torch.equal(student.encoder.embeddings.word_embeddings.weight, pca)
    # launch/speed.py takes the student and the teacher task models like any encoder
    heldout = tmp_path / "heldout" / "en"
    heldout.mkdir(parents=True)
    (heldout / "help.txt").write_text("john visited paris today with mary\n" * 4)
    assert load_script("speed").main(["--models", f"teacher={xd_inputs['teacher']}", f"student={out / 'model'}",
                                      "--teacher-of", "student=teacher", "--heldout", str(tmp_path / "heldout"),
                                      "--out", str(tmp_path / "speed"), "--num-sentences", "4", "--batch-size", "2",
                                      "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    speed = json.loads((tmp_path / "speed" / "speed.json").read_text())["models"]
    assert (speed["student"]["num_layers"], speed["student"]["hidden_size"]) == (2, 32)
    assert (speed["teacher"]["num_layers"], speed["teacher"]["hidden_size"]) == (6, 48)
    # a re-run with the same settings is skipped; other settings are refused naming them
    assert xr.run(config(xd_inputs, out, freeze_embeddings=True)).en == result.en
    with pytest.raises(FileExistsError, match="lr"):
        xr.run(config(xd_inputs, out, freeze_embeddings=True, lr=2e-3))


def test_a_sentence_pair_teacher_is_distilled_through_its_classes(xd_inputs, tmp_path):
    from ds_kd.finetune import xtremedistil_run as xr

    out = tmp_path / "pair"
    result = xr.run(config(xd_inputs, out, task="xnli", teacher=str(xd_inputs["root"] / "pair-teacher"),
                           layer_map="uniform", embeddings="random"))
    assert result.task == "xnli" and set(result.scores) == {"en", "fr", "de"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layer_map"] == [0, 3, 6] and len(manifest["losses"]) == 3 + 2 * 4 * 2  # embeddings unfreeze
    assert all(loss == loss and loss >= 0 for loss in manifest["losses"])  # finite: the logits MSE ran on classes


def test_a_task_of_ones_own_is_distilled(xd_inputs, tmp_path):
    from ds_kd.finetune import xtremedistil_run as xr

    data = own_task_data(tmp_path / "tasks", "mood", "pair", ["en", "fr", "de"], num_train=24, num_eval=8)
    result = xr.run(config(xd_inputs, tmp_path / "run", task="mood", data=str(data), represent_steps=1,
                           logits_steps=1, labels_steps=1, teacher=str(xd_inputs["root"] / "pair-teacher")))
    assert (result.task, result.metric) == ("mood", "accuracy") and set(result.scores) == {"en", "fr", "de"}


@pytest.mark.parametrize("where", ["missing", "not a corpus", "its shards folder without a manifest"])
def test_a_transfer_set_that_is_not_a_corpus_names_the_flag_and_the_command_that_builds_one(xd_inputs, tmp_path,
                                                                                             where):
    from ds_kd.errors import UsageError
    from ds_kd.finetune import xtremedistil_run as xr

    transfer = tmp_path / "corpus"
    if where != "missing":
        (transfer / ("shards" if "shards" in where else "raw")).mkdir(parents=True)
    with pytest.raises(UsageError) as refused:
        xr.run(config(xd_inputs, tmp_path / "run", transfer=str(transfer)))
    message = str(refused.value)
    assert message.startswith(f"--transfer {transfer}: " + ("no such directory" if where == "missing" else
                                                            "not a corpus (no shards manifest"))
    assert "python -m data_prep corpus" in message
    assert not (tmp_path / "run").exists()


def test_frozen_embeddings_stay_out_of_the_optimizer(xd_inputs, tmp_path):
    from ds_kd.finetune import xtremedistil_run as xr

    runner = xr.Runner(config(xd_inputs, tmp_path / "r", freeze_embeddings=True), Path(xd_inputs["teacher"]), {})
    embeddings = set(map(id, runner.student.encoder.embeddings.parameters()))
    for sub in runner.plan:
        params = runner.trainable(sub)
        assert not embeddings & set(map(id, params)), sub.name
    before = runner.student.encoder.embeddings.word_embeddings.weight.clone()
    sub = runner.plan[0]
    params = runner.trainable(sub)
    runner.step(sub, params, torch.optim.AdamW(params, lr=1e-2))
    assert torch.equal(runner.student.encoder.embeddings.word_embeddings.weight, before)
    assert runner.student.encoder.embeddings.word_embeddings.weight.grad is None


def test_early_stopping_restores_the_best_dev_weights(xd_inputs, tmp_path, monkeypatch):
    from ds_kd.finetune import xtremedistil_run as xr

    runner = xr.Runner(config(xd_inputs, tmp_path / "r", patience=2, logits_steps=10), Path(xd_inputs["teacher"]),
                       {})
    scores, states = iter([0.2, 0.5, 0.4, 0.3, 0.9]), []

    def scripted() -> float:
        states.append({k: v.clone() for k, v in runner.student.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(runner, "dev_score", scripted)
    record = runner.run_sub_stage(runner.plan[-1], 10, None)  # labels, all trainable
    assert record["stopped_early"] and record["steps"] == 4 and record["best_dev"] == 0.5
    final = runner.student.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[3][k]) for k in final)


@pytest.mark.parametrize("kill_at", [5, 8])  # right after a sub-stage ended; one step into a sub-stage
def test_a_killed_run_resumes_mid_stage_to_the_same_losses(xd_inputs, tmp_path, monkeypatch, kill_at):
    from ds_kd.errors import UsageError
    from ds_kd.finetune import xtremedistil_run as xr

    whole = xr.run(config(xd_inputs, tmp_path / "whole"))
    losses = json.loads((tmp_path / "whole" / "manifest.json").read_text())["losses"]
    killed = tmp_path / "killed"
    calls, step = [0], xr.Runner.step

    def dying(self, *a):
        calls[0] += 1
        if calls[0] > kill_at:
            raise KeyboardInterrupt
        return step(self, *a)

    monkeypatch.setattr(xr.Runner, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        xr.run(config(xd_inputs, killed))
    monkeypatch.setattr(xr.Runner, "step", step)
    with pytest.raises(FileExistsError):
        xr.run(config(xd_inputs, killed))  # an unfinished run needs --resume
    resumed = xr.run(config(xd_inputs, killed, resume=True))
    again = json.loads((killed / "manifest.json").read_text())["losses"]
    assert len(again) == len(losses)
    torch.testing.assert_close(torch.tensor(again), torch.tensor(losses), atol=1e-6, rtol=1e-5)
    assert resumed.scores == whole.scores
    with pytest.raises(UsageError):
        xr.run(config(xd_inputs, tmp_path / "fresh", resume=True))


def test_two_ranks_through_the_launcher_resume_a_one_rank_run(xd_inputs, tmp_path, monkeypatch):
    """A 1-rank run killed mid-stage resumes on 2 ranks through the real launcher and gives the uninterrupted
    1-rank run's losses (fp32, no dropout: within 1e-5, the order of the two ranks' gradient sums)."""
    from ds_kd.finetune import xtremedistil_run as xr
    from ds_kd.finetune.heads import load_task_model

    xr.run(config(xd_inputs, tmp_path / "whole"))
    losses = json.loads((tmp_path / "whole" / "manifest.json").read_text())["losses"]
    out = tmp_path / "two"
    calls, step = [0], xr.Runner.step

    def dying(self, *a):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return step(self, *a)

    monkeypatch.setattr(xr.Runner, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        xr.run(config(xd_inputs, out))
    args = ["--teacher", xd_inputs["teacher"], "--transfer", xd_inputs["transfer"], "--task", "wikiann", "--data",
            xd_inputs["data"], "--student", xd_inputs["student"], "--out", str(out), "--transfer-batch", "4",
            "--label-batch", "4", "--represent-steps", "3", "--logits-steps", "2", "--labels-steps", "2",
            "--eval-every", "1", "--patience", "5", "--max-len", "32", "--save-every", "1", "--num-workers", "0",
            "--lr", "1e-3", "--resume"]
    proc = run_cmd(deepspeed_cmd("launch/task_distill.py", args), timeout=300)
    assert proc.returncode == 0, tail(proc)
    manifest = json.loads((out / "manifest.json").read_text())
    torch.testing.assert_close(torch.tensor(manifest["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    model, meta = load_task_model(out / "model")
    assert meta["task"] == "wikiann" and model.encoder.config.hidden_size == 32
    assert json.loads((out / "result.json").read_text())["scores"].keys() == {"en", "fr", "de"}
