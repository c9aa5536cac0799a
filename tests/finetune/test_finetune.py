"""Fine-tuning: encoding, every head fitting a handful of examples, the mTOP pointer decoder, frozen embeddings,
one job end to end (result.json, zero-shot average), the command line and a saved task model."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_kd.finetune import (FinetuneConfig, TaskModel, build_labels, collate, encode_records, evaluate,
                            freeze_embeddings, load_task_model, run)
from ds_kd.finetune.data import BOS, EOS, IGNORE, parse_target
from ds_kd.finetune.job import build_optimizer, read_result
from ds_kd.finetune.loop import logical_form, task_loss
from ds_kd.models.model import BertForMaskedLM
from ds_kd.data.tasks import TASKS
from tests.conftest import load_script
from tests.helpers.finetune_fixtures import (RECORDS, broken_model_dirs, make_export_dir, make_model_dir, make_tokenizer, vocab,
                               write_task_data)

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("encoder") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def fresh_model(model_dir: Path, kind: str, labels, seed: int = 0) -> TaskModel:
    torch.manual_seed(seed)
    model = TaskModel(BertForMaskedLM.from_pretrained(model_dir).bert, kind, labels)
    freeze_embeddings(model)
    return model


def fit(model: TaskModel, examples, steps: int, lr: float = 2e-3) -> float:
    """Full-batch steps on the examples; returns the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = collate(examples, model.kind)
    model.train()
    for _ in range(steps):
        loss, _ = task_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


# ---- encoding ----------------------------------------------------------------------------------------------


def test_word_labels_sit_on_first_subword_and_cut_words_are_predicted_O(tokenizer):
    rec = {"id": "x", "tokens": ["john", "johnson", "romeville", "in"], "tags": ["B-PER", "I-PER", "B-LOC", "O"]}
    labels = build_labels("tagging", [rec])
    (enc,) = encode_records(tokenizer, "tagging", [rec], labels, max_len=32)
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert pieces == ["[CLS]", "john", "john", "##son", "rome", "##ville", "in", "[SEP]"]
    assert enc.word_starts == [1, 2, 4, 6]
    batch = collate([enc], "tagging")
    tag = {t: i for i, t in enumerate(labels.tags)}
    assert batch["labels"][0].tolist() == [IGNORE, tag["B-PER"], tag["I-PER"], IGNORE, tag["B-LOC"], IGNORE,
                                           tag["O"], IGNORE]
    # max_len 5: [CLS] john john ##son [SEP]; romeville and in no longer fit, yet are still predicted (as O).
    (cut,) = encode_records(tokenizer, "tagging", [rec], labels, max_len=5)
    assert cut.word_starts == [1, 2] and len(cut.input_ids) == 5


def test_pair_layout_and_longest_first_truncation(tokenizer):
    rec = {"id": "p", "text_a": "john saw mary in paris today", "text_b": "mary is good", "label": "1"}
    labels = build_labels("pair", [rec])
    (enc,) = encode_records(tokenizer, "pair", [rec], labels, max_len=64)
    assert tokenizer.convert_ids_to_tokens(enc.input_ids) == \
        ["[CLS]", "john", "saw", "mary", "in", "paris", "today", "[SEP]", "mary", "is", "good", "[SEP]"]
    assert enc.token_type_ids == [0] * 8 + [1] * 4
    (cut,) = encode_records(tokenizer, "pair", [rec], labels, max_len=9)
    # 6 pieces fit: the longer text loses pieces first, so both keep 3.
    assert tokenizer.convert_ids_to_tokens(cut.input_ids) == \
        ["[CLS]", "john", "saw", "mary", "[SEP]", "mary", "is", "good", "[SEP]"]


def test_parse_targets_point_at_first_subwords_and_round_trip(tokenizer):
    rec = {"id": "o", "tokens": ["play", "johnson", "by", "johnson"],
           "logical_form": "[IN:PLAY_MUSIC [SL:ARTIST johnson ] [SL:ARTIST johnson ] ]"}
    labels = build_labels("parse", [rec])
    assert labels.ontology == ("[IN:PLAY_MUSIC", "[SL:ARTIST", "]")
    (enc,) = encode_records(tokenizer, "parse", [rec], labels, max_len=32)
    assert enc.word_starts == [1, 2, 4, 5]  # johnson = john ##son
    v = len(labels.decoder_vocab)
    # The two copies of "johnson" point at its two occurrences, in order; the form ends with [EOS].
    assert enc.target == [3, 4, v + 2, 5, 4, v + 5, 5, 5, EOS]
    assert logical_form(enc.target, rec, enc, labels) == rec["logical_form"]
    batch = collate([enc], "parse")
    assert batch["target_in"][0, 0] == BOS and batch["target_in"][0, 1:].tolist() == enc.target[:-1]
    assert parse_target("[IN:PLAY_MUSIC nobody ]", rec["tokens"], enc.word_starts, labels) is None


# ---- heads fit a handful of examples -----------------------------------------------------------------------


@pytest.mark.parametrize("kind,metric", [("pair", "accuracy"), ("tagging", "f1"), ("intent_slot", "exact_match")])
def test_head_fits_eight_examples(model_dir, tokenizer, kind, metric):
    records = RECORDS[kind](8, seed=1)
    labels = build_labels(kind, records)
    examples = encode_records(tokenizer, kind, records, labels, max_len=64)
    model = fresh_model(model_dir, kind, labels)
    before = evaluate(model, records, examples, 8, CPU)[metric]
    fit(model, examples, steps=40)
    scores = evaluate(model, records, examples, 8, CPU)
    assert scores[metric] == 1.0, (before, scores)
    if kind == "intent_slot":
        assert scores["intent_accuracy"] == 1.0 and scores["slot_f1"] == 1.0


def test_pointer_decoder_reaches_exact_match_greedy_and_beam(model_dir, tokenizer):
    records = RECORDS["parse"](8, seed=3)
    labels = build_labels("parse", records)
    examples = encode_records(tokenizer, "parse", records, labels, max_len=64)
    model = fresh_model(model_dir, "parse", labels)
    assert model.decoder.layers.num_layers == 3
    assert model.decoder.layers.layers[0].linear1.out_features == 512
    assert model.decoder.layers.layers[0].self_attn.num_heads == model.encoder.config.num_attention_heads
    assert evaluate(model, records, examples, 8, CPU, beam_size=1)["exact_match"] < 1.0
    fit(model, examples, steps=60)
    assert evaluate(model, records, examples, 8, CPU, beam_size=1)["exact_match"] == 1.0
    assert evaluate(model, records, examples, 8, CPU, beam_size=3)["exact_match"] == 1.0
    # A typed output with the task logits: ontology vocabulary + one pointer per encoder position.
    batch = collate(examples, "parse")
    out = model(**batch, output_hidden_states=True)
    steps, width = batch["target_in"].shape[1], batch["input_ids"].shape[1]
    assert out.logits["parse"].shape == (8, steps, len(labels.decoder_vocab) + width)
    assert len(out.encoder.hidden_states) == model.encoder.config.num_hidden_layers + 1


# ---- frozen embeddings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("unfreeze", [False, True])
def test_embeddings_frozen_unless_asked(model_dir, tokenizer, unfreeze):
    records = RECORDS["tagging"](8, seed=2)
    labels = build_labels("tagging", records)
    examples = encode_records(tokenizer, "tagging", records, labels, max_len=64)
    torch.manual_seed(0)
    model = TaskModel(BertForMaskedLM.from_pretrained(model_dir).bert, "tagging", labels)
    if not unfreeze:
        freeze_embeddings(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(model=str(model_dir), task="wikiann", data="-", out="-", lr=1e-3)
    optimizer, scheduler = build_optimizer(model, cfg, num_steps=5)
    batch = collate(examples, "tagging")
    for _ in range(5):
        loss, _ = task_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    embeddings = {k for k in before if k.startswith("encoder.embeddings.")}
    assert len(embeddings) == 5  # word, position, token type, LayerNorm weight and bias
    assert (changed & embeddings == set()) != unfreeze
    assert "encoder.encoder.layer.0.attention.self.query.weight" in changed
    assert "tagger.weight" in changed


# ---- one job -----------------------------------------------------------------------------------------------


def job_config(model_dir, data, out, **kw) -> FinetuneConfig:
    base = dict(model=str(model_dir), task="pawsx", data=str(data), out=str(out), seed=3, epochs=2, lr=1e-3,
                batch_size=8, eval_batch_size=16, max_len=48, device="cpu")
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_runs_own_zero_shot_average_counts_every_tested_language_and_the_papers_keeps_its_exclusions(task):
    from ds_kd.finetune.job import zero_shot_split

    spec = TASKS[task]
    tested = [*spec.test_langs, "zz"]  # every language of the paper's table, and one beyond it
    paper, own = zero_shot_split(spec, tested)
    assert own == [lang for lang in tested if lang != "en"]
    assert paper == [lang for lang in spec.test_langs if lang != "en" and lang not in spec.zero_shot_exclude]


def test_job_writes_result_with_zero_shot_average(model_dir, tmp_path):
    # PAWS-X: ja is a test language the paper leaves out of its zero-shot average; "it" is an extra test split.
    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr", "de", "es", "ja", "it"],
                           num_train=24, num_eval=8)
    result = run(job_config(model_dir, data, tmp_path / "job"))
    saved = read_result(tmp_path / "job")
    assert set(saved["scores"]) == {"en", "fr", "de", "es", "ja", "it"}
    # The paper's average keeps the paper's list; the run's own counts every tested language: ja and "it" too.
    assert saved["zero_shot_langs_paper"] == ["fr", "de", "es"]
    assert saved["zero_shot_avg_paper"] == pytest.approx(
        statistics.mean(saved["scores"][lang]["accuracy"] for lang in ("fr", "de", "es")))
    assert saved["zero_shot_langs"] == ["fr", "de", "es", "ja", "it"]
    assert saved["zero_shot_avg"] == pytest.approx(
        statistics.mean(saved["scores"][lang]["accuracy"] for lang in ("fr", "de", "es", "ja", "it")))
    assert saved["en"] == saved["scores"]["en"]["accuracy"] and saved["metric"] == "accuracy"
    assert saved["task"] == "pawsx" and saved["seed"] == 3 and saved["model"] == "tiny"
    assert saved["best_epoch"] in (1, 2) and len(saved["dev_history"]) == 2
    assert saved["dev_best"] == max(h["dev_accuracy"] for h in saved["dev_history"])
    assert saved["config"]["lr"] == 1e-3 and saved["seconds"] > 0 and saved["num_params"] > 0
    assert result.zero_shot_avg == saved["zero_shot_avg"]
    # The same seed gives the same run.
    again = run(job_config(model_dir, data, tmp_path / "again"))
    assert again.scores == result.scores and again.dev_history == result.dev_history


def test_command_line_trains_mtop_and_saves_a_reusable_model(model_dir, tmp_path):
    data = write_task_data(tmp_path / "data", "mtop", "parse", ["en", "fr", "hi"], num_train=16, num_eval=6)
    out = tmp_path / "job"
    cmd = [sys.executable, str(ROOT / "launch" / "finetune.py"), "--model", str(model_dir), "--task", "mtop",
           "--data", str(data), "--seed", "1", "--out", str(out), "--epochs", "3", "--lr", "1e-3",
           "--head-lr", "3e-3", "--batch-size", "4", "--beam-size", "2", "--device", "cpu", "--save-model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "result.json").read_text())
    assert set(saved["scores"]) == {"en", "fr", "hi"} and saved["metric"] == "exact_match"
    assert saved["zero_shot_avg"] == pytest.approx((saved["scores"]["fr"]["exact_match"]
                                                    + saved["scores"]["hi"]["exact_match"]) / 2)
    assert saved["config"]["beam_size"] == 2
    # The saved task model is the tested one: reloaded, it scores English test exactly as the job did.
    model, meta = load_task_model(out / "model")
    assert meta["kind"] == "parse" and meta["task"] == "mtop"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    records = [json.loads(line) for line in open(data / "mtop" / "test.en.jsonl")]
    examples = encode_records(tok, "parse", records, model.labels, max_len=128)
    assert evaluate(model, records, examples, 8, CPU, beam_size=2, max_steps=meta["max_decode_steps"]) \
        == saved["scores"]["en"]


def test_command_line_help_documents_every_option():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--task", "--data", "--seed", "--out", "--epochs", "--lr", "--batch-size",
                 "--max-len", "--unfreeze-embeddings", "--beam-size", "--device", "--save-model", "--threads",
                 "--resume", "--overwrite", "--head-lr"):
        assert flag in proc.stdout


def test_job_trains_with_a_swapped_step_function(model_dir, tmp_path):
    """ft-distill plugs its loss in here: the job must train with the given step, not its own."""
    data = write_task_data(tmp_path / "data", "wikiann", "tagging", ["en", "fr"], num_train=8, num_eval=4)
    calls = []

    def counting_loss(model, batch):
        out = model(**batch, output_hidden_states=True)
        calls.append(len(out.encoder.hidden_states))
        return out.loss, {"loss": float(out.loss.detach()), "extra": 1.0}

    result = run(job_config(model_dir, data, tmp_path / "job", task="wikiann", epochs=1, batch_size=4),
                 loss_fn=counting_loss)
    assert calls == [model_dir_layers(model_dir) + 1] * 2  # 8 examples / batch 4, every layer's states
    assert result.dev_history[0]["extra"] == 1.0 and set(result.scores) == {"en", "fr"}


def model_dir_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def test_job_without_extra_languages_has_the_same_two_averages(model_dir, tmp_path):
    data = write_task_data(tmp_path / "data", "wikiann", "tagging", ["en", "fr", "hi"], num_train=8, num_eval=4)
    saved = run(job_config(model_dir, data, tmp_path / "job", task="wikiann", epochs=1))
    assert saved.zero_shot_langs == saved.zero_shot_langs_paper == ["fr", "hi"]
    assert saved.zero_shot_avg == saved.zero_shot_avg_paper


# ---- segment ids (issue 12 item 1) -------------------------------------------------------------------------


def pair_batch(tokenizer):
    rec = {"id": "p", "text_a": "john saw mary", "text_b": "mary is good", "label": "1"}
    labels = build_labels("pair", [rec])
    return labels, collate(encode_records(tokenizer, "pair", [rec], labels, max_len=32), "pair")


def test_our_exports_feed_one_segment_id_and_other_checkpoints_two(model_dir, tokenizer, tmp_path):
    from ds_kd.finetune.job import build_model
    from ds_kd.models.modeldir import segment_ids_trained

    ours = make_export_dir(tmp_path / "ours")
    assert json.loads((ours / "config.json").read_text())["ds_kd"] == {"segment_ids_trained": False}
    assert segment_ids_trained(ours) is False and segment_ids_trained(model_dir) is True  # no record: BERT's 0/1
    labels, batch = pair_batch(tokenizer)
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 4  # [CLS] a a a [SEP] | b b b [SEP]
    seen = {}
    for name, directory in (("ours", ours), ("other", model_dir)):
        cfg = FinetuneConfig(model=str(directory), task="pawsx", data="-", out="-")
        model = build_model(cfg, TASKS["pawsx"], labels).eval()
        model.encoder.embeddings.register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, args[1]))
        with torch.no_grad():
            model(**batch)
        # What the encoder reads for segment B: id 0 for our export (row 1 never trained), 1 for the other.
    assert seen["ours"].tolist() == [[0] * 9]
    assert seen["other"].tolist() == [[0] * 5 + [1] * 4]


def test_task_models_of_our_exports_keep_the_record(tmp_path):
    ours = make_export_dir(tmp_path / "ours")
    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr"], num_train=8, num_eval=4)
    result = run(job_config(ours, data, tmp_path / "job", epochs=1, save_model=True))
    assert result.segment_ids_trained is False
    saved = tmp_path / "job" / "model"
    assert json.loads((saved / "config.json").read_text())["ds_kd"]["segment_ids_trained"] is False
    model, meta = load_task_model(saved)
    assert meta["segment_ids_trained"] is False and model.segment_ids_trained is False
    # The reloaded model scores like the job: it feeds the same single segment.
    from transformers import AutoTokenizer

    records = [json.loads(line) for line in open(data / "pawsx" / "test.en.jsonl")]
    examples = encode_records(AutoTokenizer.from_pretrained(str(saved)), "pair", records, model.labels, 48)
    assert evaluate(model, records, examples, 16, CPU) == result.scores["en"]


# ---- model directories without their tokenizer (issue 12 item 9) -------------------------------------------


def test_load_tokenizer_refuses_missing_or_larger_and_accepts_padded_rows(tmp_path):
    from ds_kd.models.model import BertForMaskedLM, make_config
    from ds_kd.models.modeldir import load_tokenizer

    dirs = broken_model_dirs(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{dirs['bare']}: no tokenizer files .*needed by test"):
        load_tokenizer(dirs["bare"], "test")
    with pytest.raises(ValueError, match=f"{dirs['small']}: the tokenizer has token ids up to {len(vocab()) - 1}, "
                                         f"but the model's embedding has 20 rows"):
        load_tokenizer(dirs["small"], "test")
    padded = tmp_path / "padded"  # more rows than tokenizer ids: a padded vocabulary, valid
    BertForMaskedLM(make_config("tiny-leanbert", vocab_size=len(vocab()) + 35)).save_pretrained(padded)
    make_tokenizer().save_pretrained(str(padded))
    assert len(load_tokenizer(padded, "test")) == len(vocab())


def test_fine_tuning_refuses_a_model_directory_without_its_tokenizer(tmp_path, capsys):
    finetune_main = load_script("finetune").main
    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en"], num_train=4, num_eval=2)
    for name, directory in broken_model_dirs(tmp_path).items():
        out = tmp_path / f"job-{name}"
        code = finetune_main(["--model", str(directory), "--task", "pawsx", "--data", str(data), "--out", str(out),
                              "--device", "cpu"])
        assert code == 2, name
        assert str(directory) in capsys.readouterr().err
        assert not (out / "result.json").exists()


# ---- re-running into an existing output (issue 12 item 10) ------------------------------------------------


def test_rerun_rule():
    from ds_kd.manifest import rerun_action

    same, lr = {"lr": 1e-3, "max_steps": 4}, {"lr": 2e-3, "max_steps": 4}
    longer = {"lr": 1e-3, "max_steps": 8}

    def act(recorded, wanted, finished=True, unfinished=False, overwrite=False, resume=False):
        return rerun_action("OUT", "run", recorded, wanted, finished=finished, unfinished=unfinished,
                            overwrite=overwrite, resume=resume)

    assert act(None, same, finished=False) == "start"
    with pytest.raises(ValueError, match="--resume: OUT holds no checkpoint of a run to resume: drop --resume"):
        act(None, same, finished=False, resume=True)
    assert act(same, same) == "skip" and act(same, same, resume=True) == "skip"
    with pytest.raises(FileExistsError, match=r"OUT holds a finished run with other settings \(lr: 0.001 -> 0.002\)"):
        act(same, lr)
    with pytest.raises(FileExistsError, match="--resume to extend it"):
        act(same, longer)
    assert act(same, longer, resume=True) == "extend"
    with pytest.raises(FileExistsError, match="lr: 0.001 -> 0.002"):
        act(same, {**lr, "max_steps": 8}, resume=True)  # a larger budget does not excuse another lr
    assert act(same, lr, overwrite=True) == "overwrite"
    with pytest.raises(FileExistsError, match="unfinished run: pass --resume"):
        act(same, same, finished=False, unfinished=True)
    assert act(same, longer, finished=False, unfinished=True, resume=True) == "resume"
    with pytest.raises(FileExistsError, match="lr: 0.001 -> 0.002"):
        act(same, lr, finished=False, unfinished=True, resume=True)
    with pytest.raises(FileExistsError, match="settings: .*not recorded"):
        act(None, same)


def test_finetune_rerun_skips_same_settings_refuses_others_and_overwrites(model_dir, tmp_path, capsys):
    finetune_main = load_script("finetune").main
    data = write_task_data(tmp_path / "data", "wikiann", "tagging", ["en", "fr"], num_train=8, num_eval=4)
    out = tmp_path / "job"
    args = ["--model", str(model_dir), "--task", "wikiann", "--data", str(data), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--max-len", "32", "--device", "cpu", "--threads", "1"]
    assert finetune_main(args) == 0
    first = (out / "result.json").read_text()
    assert not (out / "checkpoint").exists()  # a finished job keeps its result, not its checkpoint
    capsys.readouterr()
    # Same settings (a logging-free change such as the evaluation batch included): skipped, result untouched.
    assert finetune_main(args + ["--eval-batch-size", "3"]) == 0
    assert "same settings: skipped" in capsys.readouterr().out and (out / "result.json").read_text() == first
    # Other settings: refused, naming them; nothing changes.
    assert finetune_main(args + ["--lr", "1e-3", "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "lr: 2e-05 -> 0.001" in err and "seed: 1 -> 2" in err and "--overwrite" in err
    assert (out / "result.json").read_text() == first
    # --overwrite: run again with the new settings.
    assert finetune_main(args + ["--lr", "1e-3", "--seed", "2", "--overwrite"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["config"]["lr"] == 1e-3 and again["seed"] == 2 and again["settings"]["lr"] == 1e-3


def test_resume_without_a_checkpoint_is_refused_in_one_line(model_dir, tmp_path, capsys):
    data = write_task_data(tmp_path / "data", "wikiann", "tagging", ["en"], num_train=8, num_eval=4)
    out = tmp_path / "job"
    assert load_script("finetune").main(["--model", str(model_dir), "--task", "wikiann", "--data", str(data),
                                         "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --resume: {out} holds no checkpoint of a fine-tuning job to resume: drop --resume to "
                   f"start one there, or check --out")
    assert not (out / "result.json").exists()


def test_result_is_named_after_the_run_that_exported_the_model(tmp_path):
    data = write_task_data(tmp_path / "data", "wikiann", "tagging", ["en"], num_train=8, num_eval=4)
    export = make_export_dir(tmp_path / "runs" / "mLeanBERT" / "export", "tiny-leanbert")
    saved = run(job_config(export, data, tmp_path / "job", task="wikiann", epochs=1))
    assert saved.model == "mLeanBERT" and read_result(tmp_path / "job")["model"] == "mLeanBERT"
    assert run(job_config(export, data, tmp_path / "named", task="wikiann", epochs=1, name="mine")).model == "mine"


# ---- a killed job resumes (issue 15 item 6) ----------------------------------------------------------------


def test_killed_job_keeps_its_best_epoch_and_resumes_to_the_uninterrupted_result(model_dir, tmp_path):
    """Killed (SIGKILL) right after its first epoch's checkpoint, then resumed: the same result as a run never
    interrupted, exactly. Tolerance 0: on the CPU with the same thread count the same kernels run in the same
    order, and the checkpoint restores every state that shapes the rest (weights, AdamW moments, schedule
    step, data-order generator, dropout RNG), so any difference would be a resume bug."""
    import signal
    import time

    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr"], num_train=600, num_eval=16)
    common = dict(epochs=3, lr=1e-3, batch_size=8, threads=1)
    want = run(job_config(model_dir, data, tmp_path / "whole", **common))
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "launch" / "finetune.py"), "--model", str(model_dir), "--task", "pawsx",
           "--data", str(data), "--out", str(out), "--seed", "3", "--epochs", "3", "--lr", "1e-3", "--batch-size",
           "8", "--eval-batch-size", "16", "--max-len", "48", "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = out / "checkpoint" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the job finished before it could be killed"
    epoch = torch.load(last, weights_only=False)["epoch"]
    assert 1 <= epoch < 3
    # The best epoch so far is a usable task model.
    best, meta = load_task_model(next((out / "checkpoint").glob("best-epoch*")))
    assert meta["task"] == "pawsx" and best.kind == "pair"
    # Without --resume an unfinished job is not overwritten silently.
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "unfinished fine-tuning job: pass --resume" in refused.stderr
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    got = read_result(out)
    assert got["dev_history"] == want.dev_history and got["scores"] == want.scores
    assert got["best_epoch"] == want.best_epoch and got["threads"] == 1
    assert not (out / "checkpoint").exists()


def test_fresh_heads_train_at_their_own_default_rate_for_every_kind(model_dir):
    """The head's default learning rate (1e-3, README's sweep) is not the encoder's (2e-5), for every task kind."""
    for task, kind in (("xnli", "pair"), ("wikiann", "tagging"), ("matis", "intent_slot"), ("mtop", "parse")):
        labels = build_labels(kind, RECORDS[kind](4, seed=0))
        model = fresh_model(model_dir, kind, labels)
        cfg = FinetuneConfig(model=str(model_dir), task=task, data="-", out="-")
        optimizer, _ = build_optimizer(model, cfg, num_steps=10)
        head = {id(p) for _, p in model.head_parameters()}
        for group in optimizer.param_groups:
            assert group["initial_lr"] == (1e-3 if id(group["params"][0]) in head else 2e-5), kind


def test_pointer_decoder_runs_in_fp16_and_stays_causal():
    """In fp16 the ruled-out logits are filled with the dtype's minimum (-1e9 does not fit fp16: the fill raised),
    every logit is finite and the real ones match fp32; and step i's logits never depend on later target ids."""
    from ds_kd.finetune.pointer import PointerDecoder

    torch.manual_seed(0)
    decoder = PointerDecoder(16, 2, 10, num_layers=1, ffn_size=32, dropout=0.0).eval()
    ids, memory = torch.tensor([[1, 4, 12, 5]]), torch.randn(1, 6, 16)
    attention, pointer = torch.tensor([[1, 1, 1, 1, 0, 0]]), torch.tensor([[0, 1, 0, 1, 0, 0]])
    with torch.no_grad():
        full = decoder(ids, memory, attention, pointer)
        later_changed = decoder(torch.tensor([[1, 4, 13, 7]]), memory, attention, pointer)
        half = decoder.half()(ids, memory.half(), attention, pointer)
    assert torch.equal(full[0, :2], later_changed[0, :2]) and not torch.equal(full[0, 2:], later_changed[0, 2:])
    assert half.isfinite().all()
    allowed = full > -1e8
    torch.testing.assert_close(half.float()[allowed], full[allowed], rtol=0.02, atol=0.02)
