"""Starting a student from chosen teacher layers (DistilBERT's recipe) or a whole checkpoint (--init-from)."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from tests.conftest import run_cmd, tail
from ds_kd.models.model import BertForMaskedLM, make_config
from ds_kd.models.warmstart import FROM_INIT, init_model, student_config

VOCAB = 90


def save_teacher(directory, preset="tiny-base", vocab=VOCAB, bare=False, seed=0):
    """A random teacher checkpoint (``bare``: a transformers BertModel directory, no MLM head)."""
    import transformers

    torch.manual_seed(seed)
    model = BertForMaskedLM(make_config(preset, vocab_size=vocab))
    with torch.no_grad():  # a random, non-trivial head and LayerNorms, so copying them is visible
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.normal_(0, 0.3).add_(1.0 if name.endswith("LayerNorm.weight") else 0.0)
    model.save_pretrained(directory)
    if bare:
        hf = transformers.BertForMaskedLM.from_pretrained(directory).bert
        shutil.rmtree(directory)
        hf.save_pretrained(directory)
    return directory


def truncated_teacher(directory, layers):
    """The teacher itself through transformers, with only ``layers`` (1-based) kept in its encoder."""
    import transformers

    hf = transformers.BertForMaskedLM.from_pretrained(directory, attn_implementation="eager")
    hf.bert.encoder.layer = torch.nn.ModuleList(hf.bert.encoder.layer[l - 1] for l in layers)
    hf.config.num_hidden_layers = len(layers)
    return hf.eval()


def random_batch(vocab=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask


@pytest.mark.parametrize("layers", [[2, 4, 6], [1, 6], [5, 3]])
def test_student_from_chosen_layers_equals_the_truncated_teacher(tmp_path, layers):
    teacher = save_teacher(tmp_path / "teacher")
    cfg = student_config(FROM_INIT, VOCAB, teacher, layers)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (len(layers), 48, 3)
    torch.manual_seed(9)
    student = BertForMaskedLM(cfg)
    summary = init_model(student, BertForMaskedLM.from_pretrained(teacher), layers)
    assert summary["layers"] == layers and summary["mlm_head"] == "copied"
    want = truncated_teacher(teacher, layers)
    ids, mask = random_batch()
    with torch.no_grad():
        got = student.eval()(ids, mask, output_hidden_states=True)
        ref = want(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    assert len(got.encoder.hidden_states) == len(layers) + 1
    for ours, theirs in zip(got.encoder.hidden_states, ref.hidden_states):
        torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.logits, ref.logits.reshape(-1, VOCAB), rtol=1e-5, atol=1e-5)


def test_padded_bertmodel_teacher_gives_the_tokenizers_rows_and_a_fresh_head(tmp_path):
    """A BertModel checkpoint (no MLM head) with more embedding rows than the tokenizer, e.g. e5."""
    teacher = save_teacher(tmp_path / "teacher", vocab=VOCAB + 7, bare=True)
    cfg = student_config(FROM_INIT, VOCAB, teacher, [3, 6])
    student = BertForMaskedLM(cfg)
    source = BertForMaskedLM.from_pretrained(teacher)
    assert init_model(student, source, [3, 6])["mlm_head"].startswith("fresh")
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, source.bert.embeddings.word_embeddings.weight[
        :VOCAB])
    want = truncated_teacher(teacher, [3, 6]).bert
    ids, mask = random_batch()
    with torch.no_grad():
        got = student.bert.eval()(ids, mask).last_hidden_state
        ref = want(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_whole_checkpoint_without_init_layers(tmp_path):
    teacher = save_teacher(tmp_path / "teacher")
    cfg = student_config("tiny-base", VOCAB, teacher)  # a preset of the same shape is accepted
    model = BertForMaskedLM(cfg)
    init_model(model, BertForMaskedLM.from_pretrained(teacher))
    source = BertForMaskedLM.from_pretrained(teacher)
    for (name, a), (_, b) in zip(model.state_dict().items(), source.state_dict().items()):
        assert torch.equal(a, b), name


def test_shape_and_flag_errors_are_clear(tmp_path):
    teacher = save_teacher(tmp_path / "teacher", preset="tiny-large")  # 64 wide, 4 heads, 12 layers
    with pytest.raises(ValueError, match=r"preset 'tiny-leanbert' does not have the shape of --init-from .*"
                                         r"hidden_size 48 vs 64.*num_attention_heads 3 vs 4.*use from-init"):
        student_config("tiny-leanbert", VOCAB, teacher, [6, 12])
    with pytest.raises(ValueError, match=r"--init-layers \[13\]: .* has layers 1..12"):
        student_config(FROM_INIT, VOCAB, teacher, [6, 13])
    with pytest.raises(ValueError, match="named twice"):
        student_config(FROM_INIT, VOCAB, teacher, [6, 6])
    with pytest.raises(ValueError, match="--init-layers needs --init-from"):
        student_config("tiny-leanbert", VOCAB, None, [1])
    with pytest.raises(ValueError, match="fewer than the 91 tokens"):
        student_config(FROM_INIT, VOCAB + 1, teacher, [1])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        student_config(FROM_INIT, VOCAB, tmp_path / "nowhere", [1])


def test_pretrain_init_from_chosen_layers_end_to_end(tiny_corpus, tmp_path):
    """launch/pretrain.py --init-from T --init-layers 2 5 (no --model: the teacher's shape) on one process; with
    a zero learning rate the export is exactly the teacher's embeddings and layers 2 and 5."""
    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    teacher = save_teacher(tmp_path / "teacher", vocab=vocab + 3, bare=True)
    out = tmp_path / "run"
    proc = run_cmd([sys.executable, "launch/pretrain.py", "--deepspeed_config", "ds_configs/zero2.json",
                    "--data", str(tiny_corpus), "--out", str(out), "--max-steps", "1", "--lr", "0",
                    "--ds-override", "train_micro_batch_size_per_gpu=4", "--ds-override", "fp16.enabled=false",
                    "--num-workers", "0",
                    "--init-from", str(teacher), "--init-layers", "2", "5"])
    assert proc.returncode == 0, tail(proc)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == FROM_INIT and manifest["init"]["layers"] == [2, 5]
    assert manifest["model_config"]["num_hidden_layers"] == 2 and manifest["model_config"]["hidden_size"] == 48
    exported = BertForMaskedLM.from_pretrained(out / "export")
    source = BertForMaskedLM.from_pretrained(teacher)
    assert torch.equal(exported.bert.embeddings.word_embeddings.weight,
                       source.bert.embeddings.word_embeddings.weight[:vocab])
    for dst, number in zip(exported.bert.encoder.layer, [2, 5]):
        for (name, a), (_, b) in zip(dst.state_dict().items(), source.bert.encoder.layer[number - 1].state_dict()
                                     .items()):
            assert torch.equal(a, b), (number, name)


def test_launchers_refuse_a_width_mismatch_before_any_work(tiny_corpus, tmp_path):
    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    teacher = save_teacher(tmp_path / "teacher", preset="tiny-large", vocab=vocab)
    args = ["--deepspeed_config", "ds_configs/zero2.json", "--data", str(tiny_corpus), "--max-steps", "1",
            "--init-from", str(teacher), "--init-layers", "6", "12"]
    proc = run_cmd([sys.executable, "launch/distill.py", "--teacher", str(teacher), "--student", "tiny-leanbert",
                    "--out", str(tmp_path / "kd"), *args])
    assert proc.returncode == 2 and "hidden_size 48 vs 64" in proc.stderr, tail(proc)
    assert not (tmp_path / "kd").exists()
    proc = run_cmd([sys.executable, "launch/pretrain.py", "--model", "tiny-leanbert", "--out",
                    str(tmp_path / "pt"), *args])
    assert proc.returncode == 2 and "hidden_size 48 vs 64" in proc.stderr, tail(proc)
    proc = run_cmd([sys.executable, "launch/pretrain.py", "--out", str(tmp_path / "pt"), *args[:-5]])
    assert proc.returncode == 2 and "--model is required" in proc.stderr
