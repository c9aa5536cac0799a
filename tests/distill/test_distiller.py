"""The Distiller on tiny models in-process: frozen teacher, skipped terms, falling loss, headless teacher."""
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from ds_kd.distill import DistillConfig, Distiller
from ds_kd.models.model import BertForMaskedLM, BertSelfAttention, make_config

VOCAB = 101


def _model(preset: str, seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(make_config(preset, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))


def _batch(b=4, t=16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 10:] = 0
    mask[3, 6:] = 0
    ids[mask == 0] = 0
    chosen = (torch.rand(b, t, generator=g) < 0.25) & mask.bool()
    chosen[:, 1] = True  # at least one masked token per row
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.full_like(ids, 4), ids)  # [MASK]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_teacher_frozen_in_eval_and_bit_identical_after_training():
    """tiny-large -> tiny-leanbert mirrors mBERT8-Large -> LeanBERT: 64 vs 48 wide, 4 vs 3 heads, 12 -> 2 layers."""
    teacher, student = _model("tiny-large", 0), _model("tiny-leanbert", 1)
    distiller = Distiller(teacher, student, DistillConfig(), teacher_dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student_before = student.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    assert distiller.mapped_layers == [6, 12]
    assert sorted(distiller.projections) == ["embeddings", "layer_1", "layer_2"]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in distiller.teacher.parameters())

    trainable = distiller.trainable_parameters()
    teacher_ids = {id(p) for p in distiller.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in trainable}
    assert {id(p) for p in trainable} == {id(p) for p in student.parameters()} | {
        id(p) for p in distiller.projections.parameters()}

    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    distiller.train()
    assert distiller.student.training and not distiller.teacher.training
    assert not any(m.training for m in distiller.teacher.modules())
    for step in range(4):
        out = distiller(_batch(seed=step))
        assert set(out.terms) == {"mlm", "output", "embedding", "hidden", "attention", "total"}
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.terms.values())
        optimizer.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in distiller.teacher.parameters())
        optimizer.step()
    after = distiller.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(student_before, student.bert.encoder.layer[0].attention.self.query.weight)


def _spy(distiller: Distiller) -> dict[str, list]:
    """Record which model ran, whether it built hidden states, and whether attention asked for scores."""
    seen = {"teacher": [], "student": [], "teacher_scores": [], "student_scores": []}
    for side in ("teacher", "student"):
        model = getattr(distiller, side)
        model.bert.register_forward_hook(
            lambda mod, args, out, side=side: seen[side].append(out.hidden_states is not None))
        for module in model.modules():
            if isinstance(module, BertSelfAttention):
                module.register_forward_pre_hook(
                    lambda mod, args, side=side: seen[f"{side}_scores"].append(bool(args[2])))
    return seen


def test_zero_weights_skip_terms_and_what_the_models_compute():
    teacher, student = _model("tiny-base", 0), _model("tiny-leanbert", 1)
    batch = _batch()

    distiller = Distiller(teacher, student, DistillConfig(attention_weight=0.0))
    seen = _spy(distiller)
    out = distiller(batch)
    assert "attention" not in out.terms
    assert seen["teacher_scores"] and not any(seen["teacher_scores"]) and not any(seen["student_scores"])
    assert seen["teacher"] == [True] and seen["student"] == [True]

    distiller = Distiller(teacher, student, DistillConfig(embedding_weight=0.0, hidden_weight=0.0))
    seen = _spy(distiller)
    out = distiller(batch)
    assert set(out.terms) == {"mlm", "output", "attention", "total"}
    assert seen["teacher"] == [False] and seen["student"] == [False] and all(seen["teacher_scores"])

    # no teacher term at all: the teacher does not run (plain MLM)
    distiller = Distiller(teacher, student, DistillConfig(output_weight=0, embedding_weight=0, hidden_weight=0,
                                                          attention_weight=0))
    seen = _spy(distiller)
    out = distiller(batch)
    assert set(out.terms) == {"mlm", "total"} and seen["teacher"] == []
    assert out.loss.item() == pytest.approx(student(**batch).loss.item(), rel=1e-6)


def test_total_is_the_weighted_sum_of_the_logged_terms():
    teacher, student = _model("tiny-base", 0), _model("tiny-leanbert", 1)
    cfg = DistillConfig(mlm_weight=0.5, output_weight=2.0, embedding_weight=3.0, hidden_weight=0.25,
                        attention_weight=0.1, temperature=2.0)
    out = Distiller(teacher, student, cfg)(_batch())
    expected = sum(cfg.weight(name) * value for name, value in out.terms.items() if name != "total")
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.terms["total"].item() == pytest.approx(out.loss.item(), rel=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mlm_and_output_terms_equal_their_plain_definitions(temperature):
    """The shared log-softmax (T = 1) changes nothing: the terms equal the student's own MLM loss and the soft
    cross-entropy computed from scratch."""
    from ds_kd.distill.losses import soft_cross_entropy

    teacher, student = _model("tiny-base", 0), _model("tiny-leanbert", 1)
    batch = _batch()
    out = Distiller(teacher, student, DistillConfig(temperature=temperature))(batch)
    own = student(**batch)
    with torch.no_grad():
        target = teacher(batch["input_ids"], batch["attention_mask"], predicted=own.predicted).logits
    assert out.terms["mlm"].item() == pytest.approx(own.loss.item(), rel=1e-6)
    assert out.terms["output"].item() == pytest.approx(
        soft_cross_entropy(own.logits, target, temperature).item(), rel=1e-6)


def _trained_teacher(batch) -> BertForMaskedLM:
    """A tiny-large teacher fitted to the batch by plain MLM, so that its predictions carry information."""
    teacher = _model("tiny-large", 0)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for _ in range(12):
        loss = teacher(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher


def test_student_loss_falls_on_a_fixed_batch():
    """mBERT8-Large -> LeanBERT in miniature (projections, 4 vs 3 heads): every term falls."""
    batch = _batch()
    teacher, student = _trained_teacher(batch), _model("tiny-leanbert", 1)
    distiller = Distiller(teacher, student).train()  # fp32: on CPU, bf16 is slower at these tiny shapes
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        out = distiller(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.terms.items()})
    first, last = history[0], history[-1]
    assert last["total"] < 0.6 * first["total"], (first, last)
    for term in ("mlm", "output", "embedding", "hidden", "attention"):
        assert last[term] < 0.8 * first[term], (term, first[term], last[term])


def _headless_teacher(directory, seed=0) -> BertForMaskedLM:
    """A BertModel-style checkpoint directory (encoder weights only) loaded back: no MLM head."""
    model = _model("tiny-base", seed)
    directory.mkdir()
    tensors = {k[len("bert."):]: v.contiguous() for k, v in model.state_dict().items() if k.startswith("bert.")}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    loaded = BertForMaskedLM.from_pretrained(directory, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert not loaded.has_mlm_head
    return loaded


def test_teacher_without_mlm_head_runs_without_output_loss(tmp_path, caplog):
    teacher, student = _headless_teacher(tmp_path / "teacher"), _model("tiny-leanbert", 1)
    with caplog.at_level(logging.WARNING, logger="ds_kd.distill.module"):
        distiller = Distiller(teacher, student)
    assert "no MLM head" in caplog.text and "output loss is off" in caplog.text
    assert distiller.summary()["output_loss"] is False
    logits_rows = []
    distiller.teacher.cls.register_forward_hook(lambda *a: logits_rows.append(None))
    distiller.teacher.cls.predictions.register_forward_hook(lambda m, a, out: logits_rows.append(out.shape[0]))
    out = distiller(_batch())
    assert set(out.terms) == {"mlm", "embedding", "hidden", "attention", "total"}
    assert logits_rows == [0]  # the teacher's (random) head computed nothing
    out.loss.backward()
    with pytest.raises(ValueError, match="no MLM head"):
        Distiller(teacher, _model("tiny-leanbert", 2),
                  DistillConfig(mlm_weight=0, embedding_weight=0, hidden_weight=0, attention_weight=0))


def test_student_state_dict_is_the_student_alone(tmp_path):
    teacher, student = _model("tiny-large", 0), _model("tiny-leanbert", 1)
    distiller = Distiller(teacher, student)
    state = distiller.student_state_dict()
    assert set(state) == set(student.state_dict())
    assert not any(k.startswith(("teacher", "projections")) for k in state)
    student.save_pretrained(tmp_path, state_dict=state)
    reloaded = BertForMaskedLM.from_pretrained(tmp_path).eval()
    batch = _batch()
    torch.testing.assert_close(reloaded(**batch).logits, student.eval()(**batch).logits)
    # a state gathered elsewhere (ZeRO-3) in the Distiller's naming is filtered the same way
    assert set(distiller.student_state_dict(distiller.state_dict())) == set(state)


def test_configuration_errors_and_explicit_map():
    teacher, student = _model("tiny-base", 0), _model("tiny-leanbert", 1)
    assert Distiller(teacher, student, DistillConfig(layer_map=[2, 5])).mapped_layers == [2, 5]
    with pytest.raises(ValueError, match="has 3 entries"):
        Distiller(teacher, student, DistillConfig(layer_map=[2, 4, 6]))
    with pytest.raises(ValueError, match="hidden_weight must be >= 0"):
        DistillConfig(hidden_weight=-1)
    with pytest.raises(ValueError, match="every loss weight is zero"):
        DistillConfig(mlm_weight=0, output_weight=0, embedding_weight=0, hidden_weight=0, attention_weight=0)
    other_vocab = BertForMaskedLM(make_config("tiny-leanbert", vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="vocabulary"):
        Distiller(teacher, other_vocab)


def test_no_state_dict_of_the_distiller_holds_a_teacher_tensor():
    """The teacher's decoder is tied to its word embeddings: both names stay out (ZeRO-2 checkpoints held one)."""
    teacher, student = _model("tiny-large", 0), _model("tiny-leanbert", 1)
    assert teacher.cls.predictions.decoder.weight is teacher.bert.embeddings.word_embeddings.weight
    distiller = Distiller(teacher, student, DistillConfig())
    # inside the Distiller the decoder reads the embeddings without a Parameter of its own (DeepSpeed lists a
    # tied pair as shared params), and the teacher's logits are unchanged
    assert not list(teacher.cls.predictions.decoder.parameters())
    assert len({id(p) for p in teacher.parameters()}) == len(list(teacher.named_parameters(remove_duplicate=False)))
    x = torch.randn(3, teacher.config.hidden_size)
    assert torch.equal(teacher.cls.predictions.decoder(x), x @ teacher.bert.embeddings.word_embeddings.weight.T)
    state = distiller.state_dict()
    assert not [k for k in state if k.startswith("teacher.")]
    assert {f"student.{k}" for k in student.state_dict()} <= set(state)
    assert any(k.startswith("projections.") for k in state)
    # a nested prefix (the module inside a wrapper) is handled too
    wrapper = torch.nn.ModuleDict({"inner": distiller})
    assert not [k for k in wrapper.state_dict() if k.startswith("inner.teacher.")]
    # and a state without the teacher loads back (strict=False, as DeepSpeed resumes)
    result = Distiller(_model("tiny-large", 0), _model("tiny-leanbert", 5)).load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.startswith("teacher.") for k in result.missing_keys)


def test_global_denominators_make_the_loss_the_mean_over_the_whole_batch():
    """Two halves of a batch, each with the whole batch's counts halved, sum to the loss of the whole batch."""
    from ds_kd.train.loop import global_denominators

    teacher, student = _model("tiny-large", 0), _model("tiny-leanbert", 1)
    distiller = Distiller(teacher, student, DistillConfig())
    batch = _batch(b=4, t=16, seed=3)
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]  # uneven: 1 and 3 rows
    whole = distiller(batch)
    denominators = global_denominators(halves)
    parts = [distiller(h, denominators) for h in halves]
    for name in ("mlm", "output", "embedding", "hidden", "attention"):
        assert (parts[0].terms[name] + parts[1].terms[name]).item() / 2 == pytest.approx(
            whole.terms[name].item(), rel=2e-5), name


def test_teacher_with_padded_vocabulary_rows_gives_the_losses_of_the_same_teacher_without_them():
    """Rows past the tokenizer (public checkpoints pad the embedding) are never looked up, and the output loss
    is taken over the student's ids: the terms equal those of the teacher cut to the tokenizer's size."""
    torch.manual_seed(0)
    padded = BertForMaskedLM(make_config("tiny-base", vocab_size=VOCAB + 35, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0))
    cut = BertForMaskedLM(make_config("tiny-base", vocab_size=VOCAB, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))
    cut.load_state_dict({k: v[:VOCAB] if v.shape[:1] == (VOCAB + 35,) else v
                         for k, v in padded.state_dict().items()})
    batch = _batch()
    got = Distiller(padded, _model("tiny-leanbert", 1)).eval()(batch).terms
    want = Distiller(cut, _model("tiny-leanbert", 1)).eval()(batch).terms
    assert set(got) == {"mlm", "output", "embedding", "hidden", "attention", "total"}
    for term in want:
        torch.testing.assert_close(got[term], want[term], rtol=1e-6, atol=1e-7)


def test_load_teacher_accepts_more_embedding_rows_than_tokens_and_refuses_fewer(tmp_path):
    from ds_kd.distill.run import load_teacher

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ds_kd.schema import tokenizer_hash

    vocab = {f"[{t}]": i for i, t in enumerate(("PAD", "UNK", "CLS", "SEP", "MASK"))}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})  # the shards' tokenizer: VOCAB ids
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")),
                                        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                        mask_token="[MASK]")
    BertForMaskedLM(make_config("tiny-base", vocab_size=VOCAB + 35)).save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(str(tmp_path / "padded"))
    manifest = {"vocab_size": VOCAB, "tokenizer_hash": tokenizer_hash(tmp_path / "padded" / "tokenizer.json")}
    assert load_teacher(str(tmp_path / "padded"), VOCAB, manifest, tmp_path / "padded").config.vocab_size == VOCAB + 35
    BertForMaskedLM(make_config("tiny-base", vocab_size=VOCAB - 1)).save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(str(tmp_path / "small"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'small'}/config.json: teacher vocabulary of {VOCAB - 1} "
                                         f"tokens .* fewer than the {VOCAB} of the tokenizer"):
        load_teacher(str(tmp_path / "small"), VOCAB, manifest, tmp_path / "padded")
