"""Lottery-ticket sparse fine-tuning (BiStil's phase 2): exactly K weights, a reset to the start, untouched weights
bit-identical under AdamW's weight decay, the sparse difference, a phase-B resume with the same mask."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ds_kd.finetune import load_task_model
from ds_kd.finetune import state as state_mod
from ds_kd.finetune.job import read_result
from ds_kd.eval.report import collect
from ds_kd.finetune.ltsft import (DIFF_FILE, MASK_FILE, PHASE_A_SUFFIX, SparseConfig, SparseMask, apply_difference, body_parameters,
                                  run_ltsft, select_top_k)
from ds_kd.models.model import BertForMaskedLM
from tests.finetune.test_finetune import job_config
from tests.helpers.finetune_fixtures import make_model_dir, write_task_data


def test_exactly_k_weights_are_chosen_with_ties_broken_by_position():
    start = {"a": torch.zeros(10), "b": torch.zeros(2, 5)}
    tuned = {"a": torch.tensor([0.0, 3, 1, 1, 1, 0, 2, 1, 0, 0]), "b": torch.tensor([[1.0, 1, -3, 0, 0],
                                                                                      [0, 0, 0, 1, 0]])}
    masks = select_top_k(start, tuned, density=0.25)  # K = floor(0.25 x 20) = 5, and seven entries moved by 1
    assert sum(int(m.sum()) for m in masks.values()) == 5
    # the three largest (3, -3, 2), then the first two of the tied 1s in order (a before b, flat order)
    assert torch.nonzero(masks["a"]).flatten().tolist() == [1, 2, 3, 6]
    assert torch.nonzero(masks["b"].flatten()).flatten().tolist() == [2]
    assert sum(int(m.sum()) for m in select_top_k(start, tuned, density=0.33).values()) == math.floor(0.33 * 20)
    with pytest.raises(ValueError, match="density"):
        select_top_k(start, tuned, density=0.0)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"dense": nn.Linear(6, 6), "LayerNorm": nn.LayerNorm(6)})
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.encoder["LayerNorm"](self.encoder["dense"](x)))


def test_entries_outside_the_mask_stay_bit_identical_under_adamw_with_weight_decay():
    torch.manual_seed(0)
    model = _Toy()
    assert set(body_parameters(model)) == {"encoder.dense.weight", "encoder.dense.bias"}  # no LayerNorm, no head
    start_head = model.head.weight.detach().clone()
    masks = {"encoder.dense.weight": torch.rand(6, 6) < 0.2, "encoder.dense.bias": torch.zeros(6, dtype=torch.bool)}
    constraint = SparseMask(model, masks)  # and freezes LayerNorm
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    constraint.attach(optimizer)
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 6)).square().sum().backward()
        optimizer.step()
    weight = model.encoder["dense"].weight.detach()
    outside = ~masks["encoder.dense.weight"]
    assert torch.equal(weight[outside], before["encoder.dense.weight"][outside])  # bit-identical
    assert torch.equal(model.encoder["dense"].bias, before["encoder.dense.bias"])
    assert (weight[masks["encoder.dense.weight"]] != before["encoder.dense.weight"][masks["encoder.dense.weight"]]).all()
    assert torch.equal(model.encoder["LayerNorm"].weight, before["encoder.LayerNorm.weight"])  # frozen
    assert not torch.equal(model.head.weight, start_head)  # the head trains densely
    difference = constraint.difference()
    assert difference["encoder.dense.weight.indices"].numel() == int(masks["encoder.dense.weight"].sum())
    fresh = _Toy()
    fresh.load_state_dict({**{k: v for k, v in before.items()}, "head.weight": model.head.weight,
                           "head.bias": model.head.bias})
    apply_difference(fresh, difference)
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("encoder") / "tiny")


def test_ltsft_job_changes_at_most_k_body_weights_and_its_difference_reproduces_the_logits(encoder, tmp_path):
    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr"], num_train=48)
    cfg = job_config(encoder, data, tmp_path / "job", epochs=2, save_model=True, weight_decay=0.1)
    result = run_ltsft(cfg, SparseConfig(density=0.08, full_epochs=1))
    facts = read_result(cfg.out)["sparse"]
    assert facts == result.sparse
    assert facts["k"] == math.floor(0.08 * facts["num_body_weights"])
    merged, _ = load_task_model(Path(cfg.out) / "model")
    start = BertForMaskedLM.from_pretrained(encoder).bert
    changed = sum(int((p != s).sum()) for (n, p), s in zip(merged.encoder.named_parameters(),
                                                          start.parameters()))
    assert 0 < changed == facts["num_changed_body_weights"] <= facts["k"]  # checked exactly on the weights
    mask = load_file(str(Path(cfg.out) / MASK_FILE))
    for name, p in merged.encoder.named_parameters():
        if "LayerNorm" in name or name.startswith("embeddings."):
            assert torch.equal(p, dict(start.named_parameters())[name])  # frozen in phase B
    assert sum(int(m.sum()) for m in mask.values()) == facts["k"]
    # the start plus the sparse difference, with the merged head, gives the merged model's logits
    rebuilt, _ = load_task_model(Path(cfg.out) / "model")
    with torch.no_grad():
        for (name, p), s in zip(rebuilt.encoder.named_parameters(), start.parameters()):
            p.copy_(s)
    apply_difference(rebuilt, load_file(str(Path(cfg.out) / DIFF_FILE)))
    ids = torch.randint(5, merged.encoder.config.vocab_size, (3, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want, got = merged.eval()(**batch).logits, rebuilt.eval()(**batch).logits
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_a_kill_in_phase_b_resumes_with_the_same_mask_to_the_same_result(encoder, tmp_path, monkeypatch, capsys):
    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr"], num_train=48)
    sparse = SparseConfig(density=0.08, full_epochs=1)
    whole = run_ltsft(job_config(encoder, data, tmp_path / "whole", epochs=2, threads=1), sparse)
    cfg = job_config(encoder, data, tmp_path / "killed", epochs=2, threads=1)
    real_save = state_mod.save

    def killed_after_phase_b_epoch_1(out, *args, **kw):
        real_save(out, *args, **kw)
        if Path(out) == Path(cfg.out):
            raise KeyboardInterrupt  # killed right after phase B's first checkpoint

    monkeypatch.setattr(state_mod, "save", killed_after_phase_b_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_ltsft(cfg, sparse)
    mask_bytes = (Path(cfg.out) / MASK_FILE).read_bytes()
    # phase A's result is a row of its own: a job stopped in phase B has no LT-SFT row in a report yet
    assert {row for row, _ in collect(cfg.out)} == {whole.model + PHASE_A_SUFFIX}
    monkeypatch.setattr(state_mod, "save", real_save)
    shutil.rmtree(Path(cfg.out) / "full" / "model")  # phase A's weights are gone: the mask can only be the file's
    capsys.readouterr()
    resumed = run_ltsft(replace(cfg, resume=True), sparse)
    assert "resuming the unfinished job" in capsys.readouterr().out
    assert (Path(cfg.out) / MASK_FILE).read_bytes() == mask_bytes
    assert load_file(str(Path(cfg.out) / MASK_FILE)).keys() == load_file(str(tmp_path / "whole" / MASK_FILE)).keys()
    assert resumed.dev_history == whole.dev_history and resumed.scores == whole.scores
    assert {row for row, _ in collect(cfg.out)} == {whole.model, whole.model + PHASE_A_SUFFIX}
    assert resumed.sparse["num_changed_body_weights"] == whole.sparse["num_changed_body_weights"]
    assert json.loads((Path(cfg.out) / "result.json").read_text())["sparse"]["k"] == whole.sparse["k"]


def test_the_restricted_task_teacher_gives_the_full_teachers_outputs_on_the_pairs_text(encoder, tmp_path):
    from transformers import AutoTokenizer

    from data_prep.trim_vocab import trim
    from ds_kd.finetune import run
    from tests.conftest import load_script
    from tests.helpers.finetune_fixtures import pair_records

    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr"], num_train=24)
    run(job_config(encoder, data, tmp_path / "teacher", epochs=1, save_model=True))
    text = [f"{r['text_a']} {r['text_b']}" for r in pair_records(30, seed=7)]
    (tmp_path / "pair.txt").write_text("".join(t + "\n" for t in text[:20]), encoding="utf-8")
    trimmed = tmp_path / "trimmed"
    trim(encoder, [tmp_path / "pair.txt"], trimmed)
    restricted = tmp_path / "restricted"  # through the command (launch/restrict_teacher.py)
    assert load_script("restrict_teacher").main(["--teacher", str(tmp_path / "teacher" / "model"), "--vocab",
                                                 str(trimmed), "--out", str(restricted)]) == 0
    full_model, _ = load_task_model(tmp_path / "teacher" / "model")
    small_model, _ = load_task_model(restricted)
    assert small_model.encoder.config.vocab_size < full_model.encoder.config.vocab_size
    full_tok, small_tok = AutoTokenizer.from_pretrained(str(encoder)), AutoTokenizer.from_pretrained(str(restricted))
    for tok_model in ((full_tok, full_model), (small_tok, small_model)):
        tok_model[1].eval()
    lines = text[:20]
    with torch.no_grad():
        want = full_model(**full_tok(lines, padding=True, return_tensors="pt", return_token_type_ids=False)).logits
        got = small_model(**small_tok(lines, padding=True, return_tensors="pt", return_token_type_ids=False)).logits
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_finetune_command_runs_ltsft_with_bistils_task_distillation(encoder, tmp_path):
    from ds_kd.finetune import run
    from tests.conftest import load_script

    data = write_task_data(tmp_path / "data", "pawsx", "pair", ["en", "fr"], num_train=24)
    run(job_config(encoder, data, tmp_path / "teacher", epochs=1, save_model=True))
    out = tmp_path / "student"
    finetune = load_script("finetune")
    assert finetune.main(["--model", str(encoder), "--task", "pawsx", "--data", str(data), "--out", str(out),
                          "--epochs", "1", "--batch-size", "8", "--max-len", "48", "--device", "cpu",
                          "--teacher", str(tmp_path / "teacher"), "--sparse-density", "0.1",
                          "--full-epochs", "1"]) == 0
    result = read_result(out)
    assert result["sparse"]["density"] == 0.1 and result["settings"]["sparse"]["full_epochs"] == 1
    distill = json.loads((out / "distill.json").read_text())
    assert distill["config"]["temperature"] == 2.0 and distill["config"]["attention_target"] == "probabilities"
    assert distill["config"]["mlm_weight"] == 0.0  # no hard labels unless --task-weight
    assert (out / "full" / "distill.json").is_file()  # phase A distils too


def test_distill_loss_tinybert_is_the_grids_ft_distill_loss_and_refuses_bistils_knobs(capsys):
    """``--distill-loss tinybert`` gives the grid's ft-distill rows' loss (the paper's: every DistillConfig default);
    bistil keeps its defaults (temperature 2, no hard labels); --temperature or --task-weight with tinybert is
    refused naming the flag."""
    from ds_kd.distill.module import DistillConfig
    from ds_kd.finetune.ltsft import bistil_task_losses
    from tests.conftest import load_script

    finetune = load_script("finetune")
    base = ["--model", "m", "--task", "pawsx", "--data", "d", "--out", "o", "--teacher", "t"]
    parse = finetune.build_parser().parse_args
    assert finetune.distill_losses(parse(base + ["--distill-loss", "tinybert"])) == DistillConfig()
    assert finetune.distill_losses(parse(base)) == bistil_task_losses(0.0, 2.0)
    assert finetune.distill_losses(parse(base + ["--temperature", "3", "--task-weight", "0.5"])) == \
        bistil_task_losses(0.5, 3.0)
    assert finetune.main(base + ["--distill-loss", "tinybert", "--temperature", "2"]) == 2
    assert "--temperature: not with --distill-loss tinybert" in capsys.readouterr().err
