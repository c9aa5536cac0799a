"""`launch/pretrain.py --model-config FILE`: any BERT shape from a Hugging Face config.json."""
from __future__ import annotations

import json
import sys

import pytest
import transformers

from tests.conftest import ROOT, load_script, run_cmd, tail
from ds_kd.models.model import PRESETS, make_config
from ds_kd.train.pretrain import PretrainConfig, run

SHAPE = dict(hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=96,
             max_position_embeddings=96)


@pytest.fixture
def config_json(tmp_path):
    transformers.BertConfig(vocab_size=30522, **SHAPE).save_pretrained(tmp_path / "shape")
    return tmp_path / "shape" / "config.json"


def test_config_file_gives_its_shape_with_the_corpus_vocabulary(config_json):
    cfg = make_config(str(config_json), vocab_size=300)
    assert {k: getattr(cfg, k) for k in SHAPE} == SHAPE
    assert cfg.vocab_size == 300
    assert (cfg.hidden_size, cfg.num_hidden_layers) not in {(p.hidden_size, p.num_hidden_layers)
                                                              for p in PRESETS.values()}


def test_bad_config_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json: model config file not found"):
        make_config(str(tmp_path / "absent.json"))
    roberta = tmp_path / "roberta.json"
    roberta.write_text(json.dumps({"model_type": "roberta", "hidden_size": 32}))
    with pytest.raises(ValueError, match="roberta.json: not a BERT checkpoint: model_type='roberta'"):
        make_config(str(roberta))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="odd.json: hidden_size 30 is not divisible by 4 heads"):
        make_config(str(odd))


def test_model_and_model_config_are_exclusive_and_one_is_required(config_json):
    parser = load_script("pretrain").build_parser()
    base = ["--deepspeed_config", "ds_configs/zero2.json", "--data", "d", "--out", "o", "--max-steps", "1"]
    assert parser.parse_args([*base, "--model-config", str(config_json)]).model_config == str(config_json)
    for bad in ([*base], [*base, "--model", "tiny-base", "--model-config", str(config_json)]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_run_checks_the_config_files_shape_before_any_work(tiny_corpus, tmp_path, config_json):
    cfg = PretrainConfig(deepspeed_config="ds_configs/zero2.json", data=str(tiny_corpus), out=str(tmp_path / "run"),
                         model=str(config_json), max_steps=1, max_len=128)
    with pytest.raises(ValueError, match="--max-len 128 exceeds the model's 96 position embeddings"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_pretraining_with_a_config_file_exports_that_shape(tiny_corpus, tmp_path, config_json):
    out = tmp_path / "run"
    proc = run_cmd([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--deepspeed", "--deepspeed_config",
                    "ds_configs/zero2.json", "--model-config", str(config_json), "--data", str(tiny_corpus),
                    "--out", str(out), "--max-steps", "2", "--max-len", "64", "--num-workers", "0",
                    "--ds-override", "train_micro_batch_size_per_gpu=4"], timeout=300)
    assert proc.returncode == 0, tail(proc)
    exported = json.loads((out / "export" / "config.json").read_text())
    assert {k: exported[k] for k in SHAPE} == SHAPE
    vocab = json.loads((tiny_corpus / "shards" / "manifest.json").read_text())["vocab_size"]
    assert exported["vocab_size"] == vocab
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"] == str(config_json)
