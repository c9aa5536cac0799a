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


@pytest.mark.parametrize("transfer_rows", [0, 24])  # online; a cache of 6 batches for 11 transfer steps
def test_two_ranks_through_the_launcher_resume_a_one_rank_run(xd_inputs, tmp_path, monkeypatch, transfer_rows):
    """A 1-rank run killed mid-stage resumes on 2 ranks through the real launcher and gives the uninterrupted
    1-rank run's losses (fp32, no dropout: within 1e-5, the order of the two ranks' gradient sums). Cached, each
    rank reads its half of every global batch the 1-rank run built."""
    from ds_kd.finetune import xtremedistil_run as xr
    from ds_kd.finetune.heads import load_task_model

    xr.run(config(xd_inputs, tmp_path / "whole", transfer_rows=transfer_rows))
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
        xr.run(config(xd_inputs, out, transfer_rows=transfer_rows))
    args = ["--teacher", xd_inputs["teacher"], "--transfer", xd_inputs["transfer"], "--task", "wikiann", "--data",
            xd_inputs["data"], "--student", xd_inputs["student"], "--out", str(out), "--transfer-batch", "4",
            "--label-batch", "4", "--represent-steps", "3", "--logits-steps", "2", "--labels-steps", "2",
            "--eval-every", "1", "--patience", "5", "--max-len", "32", "--save-every", "1", "--num-workers", "0",
            "--lr", "1e-3", "--resume", "--transfer-rows", str(transfer_rows)]
    proc = run_cmd(deepspeed_cmd("launch/task_distill.py", args), timeout=300)
    assert proc.returncode == 0, tail(proc)
    manifest = json.loads((out / "manifest.json").read_text())
    torch.testing.assert_close(torch.tensor(manifest["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    model, meta = load_task_model(out / "model")
    assert meta["task"] == "wikiann" and model.encoder.config.hidden_size == 32
    assert json.loads((out / "result.json").read_text())["scores"].keys() == {"en", "fr", "de"}
    if transfer_rows:
        record = manifest["teacher_cache"]  # built by the killed 1-rank run, read by both ranks
        assert record["batches"] == 6 and record["read_from"] == str(out / "teacher_cache" / record["key"])


# -- the teacher-output cache (--transfer-rows) -----------------------------------------------------------------

def test_epoch_orders_repeat_the_online_order_first_then_seeded_permutations():
    from ds_kd.finetune.teacher_cache import batch_index, epoch_order, num_batches

    assert num_batches(12, 4) == 3 and num_batches(13, 4) == 4 and num_batches(1, 4) == 1
    assert [batch_index(t, 10, 1) for t in range(10)] == list(range(10))  # pass 0: the online order
    later = [[batch_index(e * 10 + i, 10, 1) for i in range(10)] for e in (1, 2)]
    assert all(sorted(order) == list(range(10)) for order in later)
    assert later[0] != list(range(10)) and later[0] != later[1]  # each pass its own order
    assert later[0] == list(epoch_order(10, 1, 1))
    epoch_order.cache_clear()
    assert [batch_index(10 + i, 10, 1) for i in range(10)] == later[0]  # a pure function of (seed, epoch)
    assert [batch_index(10 + i, 10, 2) for i in range(10)] != later[0]  # another seed, another order


@pytest.mark.parametrize("packing", [True, False])
def test_one_reader_of_the_global_batch_reads_what_the_ranks_read_together(tiny_corpus, packing):
    """The cache is built by one reader whose micro batch is the global batch; the ranks of an online run read
    the same rows, each its consecutive slice (packed rows: the same sentences per row, widths aside)."""
    from ds_kd.data.masking import MaskingConfig
    from ds_kd.data.reader import ReaderConfig, ShardReader
    from ds_kd.train.training import resolve_data

    shards = str(resolve_data(str(tiny_corpus), None).shard_dir)

    def rows(batch):
        return [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]

    def reader(micro, rank, world):
        return iter(ShardReader(ReaderConfig(shard_dir=shards, micro_batch_size=micro, seed=3, num_workers=0,
                                             max_len=32, packing=packing,
                                             masking=MaskingConfig(mlm_probability=0.0)), rank, world))

    whole, ranks = reader(4, 0, 1), [reader(2, r, 2) for r in range(2)]
    for _ in range(5):
        assert rows(next(whole)) == rows(next(ranks[0])) + rows(next(ranks[1]))


def test_dense_scores_come_back_in_the_per_sentence_layout():
    from ds_kd.models.sentence_attention import SentenceBuckets, SentenceScores

    sequence_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 3, 0, 0]])
    buckets = SentenceBuckets.build(sequence_ids)
    gen = torch.Generator().manual_seed(0)
    scores = SentenceScores(buckets, tuple(torch.randn(n, 2, w, w, generator=gen) for n, w in buckets.shapes))
    again = SentenceScores.from_dense(scores.to_dense(3, 6), buckets)
    for a, b, keep in zip(scores.scores, again.scores, buckets.keeps()):
        pairs = (keep[:, :, None] & keep[:, None, :])[:, None].expand_as(a)
        assert torch.equal(a[pairs], b[pairs])


def count_teacher_forwards(monkeypatch) -> list[int]:
    """Count every forward pass of a teacher the run loads (the student is built, not loaded)."""
    from ds_kd.finetune import xtremedistil_run as xr

    calls, load = [0], xr.load_task_model

    def counted(directory):
        model, meta = load(directory)
        forward = model.forward

        def counting(*a, **k):
            calls[0] += 1
            return forward(*a, **k)

        model.forward = counting
        return model, meta

    monkeypatch.setattr(xr, "load_task_model", counted)
    return calls


def losses_of(out: Path) -> list[float]:
    return json.loads((out / "manifest.json").read_text())["losses"]


def cache_record(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["teacher_cache"]


def test_a_cache_of_every_step_repeats_the_online_run(xd_inputs, tmp_path):
    """While a run is in its first pass over the cache its batches are the online run's: without stage 1 (only
    fp32 logits cached) every loss equals the online run's exactly."""
    from ds_kd.finetune import xtremedistil_run as xr

    kw = dict(stages=("logits", "labels"))  # 4 sub-stages of 2 transfer steps, then 4 of 2 label steps
    online = xr.run(config(xd_inputs, tmp_path / "online", **kw))
    cached = xr.run(config(xd_inputs, tmp_path / "cached", transfer_rows=8 * 4, **kw))
    assert len(losses_of(tmp_path / "cached")) == 16
    assert losses_of(tmp_path / "cached") == losses_of(tmp_path / "online")
    assert cached.scores == online.scores
    record = cache_record(tmp_path / "cached")
    assert (record["transfer_rows"], record["batches"], record["epochs"], record["hidden_states"]) == (
        32, 8, {"logits": 1.0}, [])
    assert record["build_seconds"] > 0
    assert Path(record["read_from"]) == tmp_path / "cached" / "teacher_cache" / record["key"]
    assert cache_record(tmp_path / "online") is None
    assert "transfer_rows" in json.loads((tmp_path / "cached" / "settings.json").read_text())
    assert "teacher_cache" not in json.loads((tmp_path / "cached" / "settings.json").read_text())


@pytest.mark.parametrize("attention", [False, True])
def test_stage_one_on_fp16_teacher_states_stays_within_1e_4_of_online(xd_inputs, tmp_path, attention):
    """Stage 1 compares the student with the teacher's hidden states (and attention scores) rounded to fp16 in
    the cache: every loss of the run stays within 1e-4 (relative) of the online run's (measured: 5e-6)."""
    from ds_kd.finetune import xtremedistil_run as xr

    xr.run(config(xd_inputs, tmp_path / "online", attention=attention))
    xr.run(config(xd_inputs, tmp_path / "cached", attention=attention, transfer_rows=11 * 4))
    online, cached = losses_of(tmp_path / "online"), losses_of(tmp_path / "cached")
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(online), rtol=1e-4, atol=0)
    record = cache_record(tmp_path / "cached")
    assert record["hidden_states"] == [4, 5, 6] and record["attention"] == attention
    assert record["epochs"] == {"represent": round(3 / 11, 4), "logits": round(8 / 11, 4)}
    stages = json.loads((tmp_path / "cached" / "stages.json").read_text())
    assert [r.get("cache_epochs") for r in stages] == [round(3 / 11, 4)] + [round(2 / 11, 4)] * 4 + [None] * 4


def test_fewer_rows_cycle_over_the_cache_in_a_seeded_order(xd_inputs, tmp_path, monkeypatch):
    """3 cached batches for 8 transfer steps: steps 0-2 read the online run's first 3 batches, steps 3-5 the
    same 3 in the order of pass 1, steps 6-7 the first two of pass 2; a second run repeats it."""
    from ds_kd.finetune import xtremedistil_run as xr
    from ds_kd.finetune.teacher_cache import epoch_order

    seen, teacher_batch = [], xr.Runner.teacher_batch

    def recording(self, *a):
        inputs, ref = teacher_batch(self, *a)
        seen.append(inputs["input_ids"][inputs["attention_mask"].bool()].tolist())
        return inputs, ref

    monkeypatch.setattr(xr.Runner, "teacher_batch", recording)
    kw = dict(stages=("logits",))
    xr.run(config(xd_inputs, tmp_path / "online", **kw))
    online, seen[:] = list(seen), []
    xr.run(config(xd_inputs, tmp_path / "cached", transfer_rows=12, **kw))
    cached, seen[:] = list(seen), []
    assert len(cached) == 8 and cached[:3] == online[:3]
    assert online[3] not in online[:3]  # the online run reads new rows; the cached one cycles
    pass_1, pass_2 = epoch_order(3, 1, 1), epoch_order(3, 1, 2)
    assert pass_1 != (0, 1, 2)  # (a permutation that tells cycling in order apart)
    assert cached[3:6] == [online[i] for i in pass_1] and cached[6:] == [online[i] for i in pass_2[:2]]
    record = cache_record(tmp_path / "cached")
    assert record["batches"] == 3 and record["epochs"] == {"logits": round(8 / 3, 4)}
    xr.run(config(xd_inputs, tmp_path / "again", transfer_rows=12, **kw))
    assert seen == cached and losses_of(tmp_path / "again") == losses_of(tmp_path / "cached")


def test_a_cache_is_read_again_without_the_teacher_and_keyed_by_it(xd_inputs, tmp_path, monkeypatch):
    """A second run with the same key runs no teacher forward and gives the same losses; a partial cache is
    completed (only its missing entries computed); a run needing less (no stage 1) reads a complete cache that
    holds more; another teacher's weights give another key; every rank's rows make up the global batch."""
    from ds_kd.finetune import teacher_cache as tcache
    from ds_kd.finetune import xtremedistil_run as xr
    from ds_kd.finetune.heads import load_task_model, save_task_model
    from ds_kd.models.modeldir import load_tokenizer

    calls = count_teacher_forwards(monkeypatch)
    shared = tmp_path / "cache"
    kw = dict(transfer_rows=20, teacher_cache=str(shared))  # 5 global batches for 11 transfer steps
    xr.run(config(xd_inputs, tmp_path / "first", **kw))
    assert calls[0] == 5  # the cache's 5 batches, no transfer step's
    first = cache_record(tmp_path / "first")
    folder = shared / first["key"]
    assert [p.name for p in shared.iterdir()] == [first["key"]] and not (tmp_path / "first" / "teacher_cache").exists()

    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "second", **kw))
    assert calls[0] == 0
    assert losses_of(tmp_path / "second") == losses_of(tmp_path / "first")
    second = cache_record(tmp_path / "second")
    assert second["build_seconds"] == 0 and second["key"] == first["key"] and second["read_from"] == str(folder)

    (folder / tcache.MANIFEST).unlink()  # as if killed while building: two entries missing, no manifest
    tcache.entry_path(folder, 1).unlink()
    tcache.entry_path(folder, 3).unlink()
    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "partial", **kw))
    assert calls[0] == 2 and (folder / tcache.MANIFEST).is_file()
    assert losses_of(tmp_path / "partial") == losses_of(tmp_path / "first")

    # stage 2 alone needs the logits only: the complete cache with hidden states serves it, with the losses of
    # a cache of its own
    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "logits", stages=("logits",), **kw))
    assert calls[0] == 0 and cache_record(tmp_path / "logits")["read_from"] == str(folder)
    xr.run(config(xd_inputs, tmp_path / "own", stages=("logits",), transfer_rows=20))
    assert losses_of(tmp_path / "logits") == losses_of(tmp_path / "own")

    # the ranks' rows of each global batch, in rank order, are the global batch
    spec = tcache.complete(folder)
    whole = tcache.load(folder, spec, 0, 1)
    halves = [tcache.load(folder, spec, r, 2) for r in range(2)]
    for w, a, b in zip(whole, *halves):
        for part in ("inputs", "logits", "hidden"):
            for k in w[part]:
                assert torch.equal(w[part][k], torch.cat([a[part][k], b[part][k]])), (part, k)
    # the teacher labels a global batch in chunks of the online micro batch: the same outputs
    teacher, meta = load_task_model(xd_inputs["teacher"])
    saved = torch.load(tcache.entry_path(folder, 0), weights_only=True)
    halves = tcache.teacher_entry(teacher.eval(), saved["inputs"], spec, torch.device("cpu"), chunk=2)
    torch.testing.assert_close(halves["logits"], saved["logits"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(halves["hidden"], saved["hidden"], atol=2e-3, rtol=1e-3)  # fp16


    with torch.no_grad():
        teacher.encoder.embeddings.word_embeddings.weight[5] += 0.5
    other = tmp_path / "other-teacher"
    save_task_model(teacher, other, load_tokenizer(Path(xd_inputs["teacher"]), "test"), task=meta["task"])
    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "other", teacher=str(other), **kw))
    assert calls[0] == 5
    assert cache_record(tmp_path / "other")["key"] != first["key"] and len(list(shared.iterdir())) == 2
    assert losses_of(tmp_path / "other") != losses_of(tmp_path / "first")


def test_seeds_with_one_transfer_seed_share_one_cache(xd_inputs, tmp_path, monkeypatch):
    """--transfer-seed fixes which rows are cached: a second student seed with the first's transfer seed reads the
    first's cache without running the teacher, and still trains its own student (other losses); without it the
    second seed's transfer order is its own (another key, the teacher runs again); --transfer-seed equal to
    --seed is the default's key."""
    from ds_kd.finetune import xtremedistil_run as xr

    calls = count_teacher_forwards(monkeypatch)
    kw = dict(transfer_rows=20, teacher_cache=str(tmp_path / "cache"))
    xr.run(config(xd_inputs, tmp_path / "seed1", **kw))
    assert calls[0] == 5
    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "seed2", seed=2, transfer_seed=1, **kw))
    assert calls[0] == 0
    assert cache_record(tmp_path / "seed2")["key"] == cache_record(tmp_path / "seed1")["key"]
    assert losses_of(tmp_path / "seed2") != losses_of(tmp_path / "seed1")
    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "own", seed=2, **kw))
    assert calls[0] == 5 and cache_record(tmp_path / "own")["key"] != cache_record(tmp_path / "seed1")["key"]
    calls[0] = 0
    xr.run(config(xd_inputs, tmp_path / "explicit", seed=2, transfer_seed=2, **kw))
    assert calls[0] == 0 and cache_record(tmp_path / "explicit")["key"] == cache_record(tmp_path / "own")["key"]
    assert losses_of(tmp_path / "explicit") == losses_of(tmp_path / "own")


def test_a_killed_cached_run_resumes_mid_pass_to_the_same_losses(xd_inputs, tmp_path, monkeypatch):
    """Killed at transfer step 6 of 11, in the second pass over a cache of 4 batches, a resumed run reads the
    cache without the teacher and gives the uninterrupted run's losses."""
    from ds_kd.finetune import xtremedistil_run as xr

    kw = dict(transfer_rows=16)
    whole = xr.run(config(xd_inputs, tmp_path / "whole", **kw))
    killed = tmp_path / "killed"
    calls, step = [0], xr.Runner.step

    def dying(self, *a):
        calls[0] += 1
        if calls[0] > 6:
            raise KeyboardInterrupt
        return step(self, *a)

    monkeypatch.setattr(xr.Runner, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        xr.run(config(xd_inputs, killed, **kw))
    monkeypatch.setattr(xr.Runner, "step", step)
    forwards = count_teacher_forwards(monkeypatch)
    resumed = xr.run(config(xd_inputs, killed, resume=True, **kw))
    assert forwards[0] == 0
    torch.testing.assert_close(torch.tensor(losses_of(killed)), torch.tensor(losses_of(tmp_path / "whole")),
                               atol=1e-6, rtol=1e-5)
    assert resumed.scores == whole.scores
    assert cache_record(killed)["epochs"] == cache_record(tmp_path / "whole")["epochs"] == {
        "represent": 0.75, "logits": 2.0}


def test_a_cache_too_large_for_memory_is_refused_naming_the_flag(xd_inputs, tmp_path, monkeypatch):
    import re

    from ds_kd.errors import UsageError
    from ds_kd.finetune import teacher_cache as tcache
    from ds_kd.finetune import xtremedistil_run as xr

    monkeypatch.setattr(tcache, "available_memory", lambda: 2**20)  # 1 MiB: a quarter holds about 24 rows
    out = tmp_path / "big"
    with pytest.raises(UsageError, match=r"--transfer-rows 400\b.*available: lower --transfer-rows to at most") as e:
        xr.run(config(xd_inputs, out, transfer_rows=400))
    assert not (out / "settings.json").exists() and not (out / "teacher_cache").exists()  # before any work
    fit = int(re.search(r"at most (\d+)", str(e.value)).group(1))
    assert fit > 0 and fit % 4 == 0
    xr.Runner(config(xd_inputs, out, transfer_rows=fit), Path(xd_inputs["teacher"]), {})  # fits
    with pytest.raises(UsageError, match="--transfer-rows"):
        xr.Runner(config(xd_inputs, out, transfer_rows=fit + 4), Path(xd_inputs["teacher"]), {})
