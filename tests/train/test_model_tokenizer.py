"""A model paired with a corpus (the distillation teacher, ``--init-from``) must have the corpus's tokenizer:
otherwise the shards' token ids index other tokens' embedding rows. The refusal names the flag and the fix,
building the corpus with ``python -m data_prep corpus --tokenizer <model>``."""
from __future__ import annotations

import shutil
import sys

import pytest
from tokenizers import Tokenizer

from tests.conftest import run_cmd, tail
from ds_kd.errors import UsageError
from ds_kd.models.model import BertForMaskedLM, make_config
from ds_kd.train.training import model_config, resolve_data


def model_dir(corpus, directory, tokenizer: str = "corpus"):
    """A random tiny-base checkpoint of the corpus's vocabulary size with ``tokenizer``: ``corpus`` (its files),
    ``extra`` (the corpus's plus one token), ``vocab.txt`` (a BERT vocab.txt of the corpus's tokens, shuffled
    when ``shuffled-vocab.txt``) or ``none``."""
    vocab_size = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json")).get_vocab_size(True)
    BertForMaskedLM(make_config("tiny-base", vocab_size=vocab_size + 4)).save_pretrained(directory)
    tok = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    if tokenizer == "corpus":
        for f in (corpus / "tokenizer").iterdir():
            if f.name != "manifest.json":
                shutil.copy2(f, directory / f.name)
    elif tokenizer == "extra":
        tok.add_tokens(["extra-token"])
        tok.save(str(directory / "tokenizer.json"))
    elif tokenizer.endswith("vocab.txt"):
        tokens = sorted(tok.get_vocab(True), key=tok.get_vocab(True).get)
        if tokenizer.startswith("shuffled"):
            tokens[5], tokens[6] = tokens[6], tokens[5]
        (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return directory


def test_distillation_teacher_of_another_tokenizer_is_told_to_build_the_corpus_with_it(tiny_corpus, tmp_path):
    from ds_kd.distill.run import load_teacher

    data = resolve_data(tiny_corpus, None)
    teacher = model_dir(tiny_corpus, tmp_path / "teacher", "extra")
    with pytest.raises(UsageError) as err:
        load_teacher(str(teacher), data.vocab_size, data.manifest, data.tokenizer_dir)
    message = str(err.value)
    assert message.startswith(f"--teacher {teacher}: its tokenizer is not the one the shards were written with "
                              f"({data.vocab_size + 1} tokens, the corpus's {data.vocab_size})")
    assert f"python -m data_prep corpus --tokenizer {teacher}" in message and "\n" not in message
    same = model_dir(tiny_corpus, tmp_path / "same", "corpus")
    assert load_teacher(str(same), data.vocab_size, data.manifest, data.tokenizer_dir).config.vocab_size == \
        data.vocab_size + 4


def test_a_bare_vocab_txt_is_compared_token_by_token(tiny_corpus, tmp_path):
    """A public BERT brought with only its vocab.txt was not checked at all: the same tokens in another order
    are another tokenizer; in the corpus's order they are its own."""
    data = resolve_data(tiny_corpus, None)
    same = model_dir(tiny_corpus, tmp_path / "same", "vocab.txt")
    assert model_config("from-init", data, str(same)).vocab_size == data.vocab_size
    shuffled = model_dir(tiny_corpus, tmp_path / "shuffled", "shuffled-vocab.txt")
    with pytest.raises(UsageError, match=rf"^--init-from {shuffled}: its tokenizer is not the one the shards were "
                                         rf"written with \(the same {data.vocab_size} tokens in number, but other "
                                         rf"tokens or rules\); build the corpus with it: python -m data_prep "
                                         rf"corpus --tokenizer {shuffled} "):
        model_config("from-init", data, str(shuffled))


def test_init_from_a_checkpoint_of_another_tokenizer_is_refused_and_one_without_a_tokenizer_is_not(tiny_corpus,
                                                                                                     tmp_path):
    data = resolve_data(tiny_corpus, None)
    other = model_dir(tiny_corpus, tmp_path / "other", "extra")
    with pytest.raises(UsageError, match=f"^--init-from {other}: its tokenizer is not"):
        model_config("from-init", data, str(other))
    bare = model_dir(tiny_corpus, tmp_path / "bare", "none")  # nothing to compare: its rows are copied as before
    assert model_config("from-init", data, str(bare), [1]).num_hidden_layers == 1


def test_distill_command_prints_the_fix_on_one_line(tiny_corpus, tmp_path):
    teacher = model_dir(tiny_corpus, tmp_path / "teacher", "extra")
    proc = run_cmd([sys.executable, "launch/distill.py", "--deepspeed_config", "ds_configs/zero2.json",
                    "--teacher", str(teacher), "--data", str(tiny_corpus), "--out", str(tmp_path / "kd"),
                    "--max-steps", "1"])
    assert proc.returncode == 2, tail(proc)
    lines = [line for line in proc.stderr.splitlines() if "its tokenizer is not" in line]
    assert len(lines) == 1 and f"python -m data_prep corpus --tokenizer {teacher}" in lines[0], tail(proc)
    assert "Traceback" not in proc.stderr and not (tmp_path / "kd").exists()
