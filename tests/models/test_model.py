"""The BERT family against transformers' reference implementation, and the masked-only MLM head."""
import json

import pytest
import torch
import transformers

from ds_kd.models.model import PRESETS, BertForMaskedLM, count_parameters, make_config

TINY = make_config("tiny-base", vocab_size=97, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(vocab=97, b=3, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 7:] = 0  # a padded row
    ids[1, 7:] = 0
    labels = torch.full((b, t), -100)
    labels[0, 2] = 17
    labels[1, 3] = 40
    labels[2, [1, 5, 9]] = torch.tensor([6, 7, 8])
    return ids, mask, labels


def _hf_twin(model: BertForMaskedLM, tmp_path):
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager")
    return hf.eval()


def test_same_logits_and_loss_as_transformers(tmp_path):
    torch.manual_seed(0)
    ours = BertForMaskedLM(TINY).eval()
    hf = _hf_twin(ours, tmp_path)
    ids, mask, labels = _batch()
    out = ours(ids, mask, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    predicted = labels.ne(-100)
    torch.testing.assert_close(out.logits, ref.logits[predicted], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    # hidden states at real tokens match layer by layer
    enc = ours.bert(ids, mask, output_hidden_states=True)
    ref_h = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(enc.hidden_states) == TINY.num_hidden_layers + 1
    for a, b in zip(enc.hidden_states, ref_h):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-4, atol=1e-4)


def test_hf_checkpoint_loads_into_ours(tmp_path):
    """Bring your own checkpoint: a transformers BertForMaskedLM directory loads with identical outputs."""
    hf_cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(1)
    hf = transformers.BertForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert ours.has_mlm_head
    ids, mask, labels = _batch()
    torch.testing.assert_close(ours(ids, mask, labels=labels).loss, hf(input_ids=ids, attention_mask=mask,
                                                                       labels=labels).loss, rtol=1e-5, atol=1e-5)


def test_bare_bert_model_checkpoint_loads_without_head(tmp_path):
    hf_cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(2)
    hf = transformers.BertModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert not ours.has_mlm_head
    ids, mask, _ = _batch()
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours.bert(ids, mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)


HF_TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)


def _hf_mlm(seed: int) -> transformers.BertForMaskedLM:
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(transformers.BertConfig(**HF_TINY)).eval()


def _assert_same_mlm(ours: BertForMaskedLM, hf) -> None:
    """Same MLM logits at the labelled positions and the same loss as the transformers model."""
    ids, mask, labels = _batch()
    out = ours.eval()(ids, mask, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits[labels.ne(-100)], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_old_style_gamma_beta_names_load(tmp_path):
    """Checkpoints converted from the original TF BERT name LayerNorm parameters gamma/beta."""
    hf = _hf_mlm(5)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in hf.state_dict().items() if k != "cls.predictions.decoder.weight"}
    assert sum(".gamma" in k for k in old) == 2 * HF_TINY["num_hidden_layers"] + 2
    torch.save(old, tmp_path / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.has_mlm_head
    _assert_same_mlm(ours, hf)


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    hf = _hf_mlm(6)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.has_mlm_head
    _assert_same_mlm(ours, hf)


def test_sharded_pytorch_bin_checkpoint_loads(tmp_path):
    """pytorch_model-0000i-of-0000n.bin files with their pytorch_model.bin.index.json (older HF saves)."""
    hf = _hf_mlm(7)
    state = {k: v.clone() for k, v in hf.state_dict().items() if k != "cls.predictions.decoder.weight"}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf.config.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.has_mlm_head
    _assert_same_mlm(ours, hf)


def test_bert_for_pretraining_checkpoint_loads_with_its_mlm_head(tmp_path):
    """A BertForPreTraining checkpoint (MLM + next-sentence heads, pooler): the MLM head is kept."""
    torch.manual_seed(8)
    pre = transformers.BertForPreTraining(transformers.BertConfig(**HF_TINY)).eval()
    pre.save_pretrained(tmp_path)
    ours = BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.has_mlm_head
    ids, mask, labels = _batch()
    ref_NV = pre(input_ids=ids, attention_mask=mask).prediction_logits[labels.ne(-100)]
    torch.testing.assert_close(ours.eval()(ids, mask, labels=labels).logits, ref_NV, rtol=1e-4, atol=1e-4)


def test_non_bert_checkpoint_is_refused_naming_the_directory(tmp_path):
    transformers.RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: not a BERT checkpoint: model_type='roberta'"):
        BertForMaskedLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertForMaskedLM.from_pretrained(tmp_path / "absent")


def test_checkpoint_without_weights_is_a_clear_error(tmp_path):
    transformers.BertConfig(**HF_TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        BertForMaskedLM.from_pretrained(tmp_path)


def test_masked_only_head_loss_equals_dense_head_loss():
    torch.manual_seed(3)
    model = BertForMaskedLM(TINY).eval()
    ids, mask, labels = _batch()
    out = model(ids, mask, labels=labels)
    dense_logits = model.cls.predictions(model.bert(ids, mask).last_hidden_state)  # [B, T, V]
    dense_loss = torch.nn.functional.cross_entropy(dense_logits.view(-1, TINY.vocab_size), labels.view(-1))
    assert out.logits.shape == (int(labels.ne(-100).sum()), TINY.vocab_size)
    torch.testing.assert_close(out.loss, dense_loss, rtol=1e-6, atol=1e-6)


def test_sdpa_and_explicit_attention_agree_and_scores_are_pre_softmax():
    torch.manual_seed(4)
    model = BertForMaskedLM(TINY).eval()
    ids, mask, _ = _batch()
    fast = model.bert(ids, mask)
    slow = model.bert(ids, mask, output_hidden_states=True, output_attention_scores=True)
    torch.testing.assert_close(fast.last_hidden_state, slow.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(slow.attention_scores) == TINY.num_hidden_layers
    s = slow.attention_scores[0]
    assert s.shape == (3, TINY.num_attention_heads, 11, 11)
    # pre-softmax: rows do not sum to one and values are finite even at padded keys
    assert torch.isfinite(s).all()
    assert not torch.allclose(s.softmax(-1).sum(-1), s.sum(-1))
    # recompute layer 0's scores by hand from the embeddings
    att = model.bert.encoder.layer[0].attention.self
    x = slow.hidden_states[0]
    q = att.query(x).view(3, 11, TINY.num_attention_heads, -1).transpose(1, 2)
    k = att.key(x).view(3, 11, TINY.num_attention_heads, -1).transpose(1, 2)
    torch.testing.assert_close(s, q @ k.transpose(-1, -2) / TINY.head_dim ** 0.5)


def test_embeddings_are_tied():
    model = BertForMaskedLM(TINY)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("preset,non_embedding_millions", [("mbert8-large", 302), ("mbert8-base", 85),
                                                           ("leanbert", 17)])
def test_paper_presets_have_the_papers_parameter_counts(preset, non_embedding_millions):
    """Table 1's non-embedding counts, computed from the shapes (no model is built)."""
    c = PRESETS[preset]
    per_layer = 4 * c.hidden_size * c.hidden_size + 4 * c.hidden_size + 2 * c.hidden_size * c.intermediate_size \
        + c.intermediate_size + c.hidden_size + 4 * c.hidden_size
    assert round(per_layer * c.num_hidden_layers / 1e6) == non_embedding_millions


def test_count_parameters_splits_embeddings():
    model = BertForMaskedLM(TINY)
    emb = sum(p.numel() for p in model.bert.embeddings.parameters())
    assert count_parameters(model) - count_parameters(model, with_embeddings=False) == emb


def test_export_config_is_a_hf_bert_config(tmp_path):
    BertForMaskedLM(TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["num_hidden_layers"] == TINY.num_hidden_layers


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'bert-huge'"):
        make_config("bert-huge")


def _sharp_fp16_pair(seed: int = 0) -> tuple[BertForMaskedLM, BertForMaskedLM]:
    """The same model in fp32 and fp16, with opposite query and key biases that put every attention score near
    -25, below the -16 where an additive finfo.min mask overflows to -inf in fp16 (softmax ignores the shift)."""
    torch.manual_seed(seed)
    model = BertForMaskedLM(TINY).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.bias.fill_(10 / TINY.head_dim ** 0.5)
            layer.attention.self.key.bias.fill_(-10 / TINY.head_dim ** 0.5)
    half = BertForMaskedLM(TINY).eval()
    half.load_state_dict(model.state_dict())
    return model, half.half()


@pytest.mark.parametrize("packed_attention", ["masked", "sentences"])
@pytest.mark.parametrize("want_scores", [False, True])
def test_fp16_padding_stays_finite_and_real_tokens_match_fp32(packed_attention, want_scores):
    """Packed rows with padding, and unpacked rows (one all padding), in fp16: every hidden state is finite, the
    padding queries' too (a NaN there spreads to every token through the next layer's keys), and the real tokens'
    last hidden states equal the fp32 model's to fp16 precision. Every attention path: SDPA and explicit (with
    scores), block-diagonal mask and per-sentence buckets."""
    full, half = _sharp_fp16_pair()
    ids, _, _ = _batch()
    sequence_ids = torch.tensor([[1] * 5 + [2] * 4 + [0] * 2, [1] * 11, [1] * 3 + [0] * 8])
    position_ids = torch.tensor([list(range(5)) + list(range(4)) + [0, 0], list(range(11)), list(range(3)) + [0] * 8])
    unpacked_mask = torch.ones(3, 11, dtype=torch.long)
    unpacked_mask[1, 6:] = 0
    unpacked_mask[2] = 0  # a row of padding only
    for model in (full, half):
        model.bert.packed_attention = packed_attention
    calls = [dict(attention_mask=(sequence_ids > 0).long(), position_ids=position_ids, sequence_ids=sequence_ids),
             dict(attention_mask=unpacked_mask)]
    for kwargs in calls:
        real = kwargs["attention_mask"].bool()
        with torch.no_grad():
            got = half.bert(ids, output_hidden_states=True, output_attention_scores=want_scores, **kwargs)
            want = full.bert(ids, output_hidden_states=True, output_attention_scores=want_scores, **kwargs)
        assert all(h.isfinite().all() for h in got.hidden_states), kwargs.keys()
        torch.testing.assert_close(got.last_hidden_state[real].float(), want.last_hidden_state[real],
                                   rtol=0.05, atol=0.05)


def test_attention_keep_leaves_no_query_without_a_key():
    from ds_kd.models.model import attention_keep

    sequence_ids = torch.tensor([[1, 1, 2, 0], [0, 0, 0, 0]])
    keep = attention_keep((sequence_ids > 0).long(), sequence_ids)
    assert keep.dtype == torch.bool and keep.any(dim=-1).all()
    assert keep[0, 0].tolist() == [[True, True, False, False], [True, True, False, False],
                                   [False, False, True, False], [True, True, True, True]]
    assert attention_keep(torch.tensor([[1, 1, 0], [0, 0, 0]]), None)[:, 0, 0].tolist() == [
        [True, True, False], [True, True, True]]


def test_an_encoder_alone_is_initialised_as_bert():
    """``BertModel`` built on its own (a task student, ``launch/task_distill.py``) has BERT's initialisation, not
    torch's defaults: N(0, 1) position and segment rows would drown the word embeddings a student is given (the
    XtremeDistil student then predicted one tag for every token)."""
    from ds_kd.models.model import BertModel, make_config

    torch.manual_seed(0)
    cfg = make_config("xd-2l-256", vocab_size=3000)
    encoder = BertModel(cfg)
    for name, table in (("word", encoder.embeddings.word_embeddings), ("position", encoder.embeddings.position_embeddings),
                        ("segment", encoder.embeddings.token_type_embeddings)):
        assert abs(float(table.weight.std()) - cfg.initializer_range) < 0.1 * cfg.initializer_range, name
    dense = encoder.encoder.layer[0].intermediate.dense
    assert abs(float(dense.weight.std()) - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert float(dense.bias.abs().max()) == 0.0
    if cfg.pad_token_id is not None:
        assert float(encoder.embeddings.word_embeddings.weight[cfg.pad_token_id].abs().max()) == 0.0
