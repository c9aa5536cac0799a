"""A byte-order mark (U+FEFF, as Windows editors write) at the start of every kind of file a user brings: each
reader drops it, so it reaches no sentence, token, header field, vocabulary entry or JSON parser."""
from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import tests.helpers.taskfixtures as fx
from data_prep.read import ReadConfig, read_file
from data_prep.tasks import LangChoice, load_task
from ds_kd.textfile import BOM, BOM_BYTES

TEXT = "Quick brown foxes jump. The lazy dog sleeps.\nQuick thinking wins.\n"
WIKI_JSON = json.dumps({"id": "1", "title": "Fox", "text": "Quick foxes run.\n\nThey rest."}) + "\n"
WIKI_DOC = '<doc id="1" url="u" title="Fox">\nQuick foxes run.\n</doc>\n'


def with_bom(text: str) -> bytes:
    return BOM_BYTES + text.encode("utf-8")


CORPUS_FILES = {  # name -> (bytes on disk, the first sentence the reader must give)
    "plain.txt": (with_bom(TEXT), "Quick brown foxes jump."),
    "packed.txt.gz": (gzip.compress(with_bom(TEXT)), "Quick brown foxes jump."),
    "packed.txt.bz2": (bz2.compress(with_bom(TEXT)), "Quick brown foxes jump."),
    "packed.txt.xz": (lzma.compress(with_bom(TEXT)), "Quick brown foxes jump."),
    "wiki_00": (with_bom(WIKI_JSON), "Quick foxes run."),  # WikiExtractor --json: still read as a record
    "wiki_01": (with_bom(WIKI_DOC), "Quick foxes run."),  # WikiExtractor's <doc> wrapper: still skipped
}


@pytest.mark.parametrize("name", sorted(CORPUS_FILES))
def test_corpus_reader_drops_a_bom_in_every_format(tmp_path, name):
    raw, first = CORPUS_FILES[name]
    (tmp_path / name).write_bytes(raw)
    drops = Counter()
    sentences = list(read_file(tmp_path / name, ReadConfig(), drops))
    assert sentences[0] == first
    assert not any(BOM in s for s in sentences) and drops["bad_json"] == drops["undecodable"] == 0


def test_no_bom_reaches_the_bpe_vocabulary(tmp_path):
    """Files with a BOM, and one made by joining two such files (a BOM inside), through the corpus command."""
    from data_prep.bpe import BpeConfig
    from data_prep.corpus import CorpusConfig, run
    from data_prep.sample import SampleConfig
    from data_prep.shard import ShardConfig

    words = ["quick", "brown", "foxes", "jump", "lazy", "dogs", "sleep", "rivers", "flow", "birds", "sing"]
    for lang in ("en", "fr"):
        (tmp_path / "raw" / lang).mkdir(parents=True)
        lines = [" ".join(words[(i + k) % len(words)] for k in range(5)).capitalize() + "." for i in range(200)]
        one = with_bom("\n".join(lines[:100]) + "\n")
        (tmp_path / "raw" / lang / "a.txt").write_bytes(one)
        (tmp_path / "raw" / lang / "joined.txt.gz").write_bytes(gzip.compress(one + with_bom("\n".join(lines[100:]))))
    out = tmp_path / "corpus"
    run(CorpusConfig(raw=tmp_path / "raw", out=out, langs=("en", "fr"), read=ReadConfig(),
                     sample=SampleConfig(total=400, seed=0, val_per_lang=10, bucket_mb=0.05),
                     bpe=BpeConfig(vocab_size=200, min_frequency=1),
                     shard=ShardConfig(block_size=200, num_workers=1, batch_size=64)))
    for lang in ("en", "fr"):
        text = (out / "read" / f"{lang}.txt").read_text(encoding="utf-8")
        assert BOM not in text and text.startswith("Quick brown foxes jump lazy.")
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert not [t for t in tok.get_vocab() if BOM in t]


def add_bom_to_every_file(src: Path) -> int:
    files = [p for p in src.rglob("*") if p.is_file() and not p.name.endswith(".tar.gz")]
    for p in files:
        p.write_bytes(BOM_BYTES + p.read_bytes())
    return len(files)


@pytest.mark.parametrize("task,writer", [("xnli", fx.write_xnli), ("pawsx", fx.write_pawsx),
                                         ("wikiann", fx.write_wikiann_xtreme), ("matis", fx.write_matis),
                                         ("mtop", fx.write_mtop)])
def test_task_loaders_drop_a_bom(tmp_path, task, writer):
    """TSV with a header (the first column is still found), CoNLL-style token lines, mTOP lines."""
    src, expected, _ = writer(tmp_path)
    assert add_bom_to_every_file(src) > 0
    data = load_task(task, src, LangChoice())
    assert {key: len(rows) for key, rows in data.records.items()} == expected
    assert BOM not in json.dumps(list(data.records.values()), ensure_ascii=False)


def test_other_readers_of_user_files_drop_a_bom(tmp_path):
    from data_prep.demo_tasks import read_language
    from data_prep.existing_tokenizer import load_existing, special_token_ids
    from data_prep.libreoffice import parse_page
    from ds_kd.train.engine import load_ds_config
    from ds_kd.models.model import BertForMaskedLM, make_config
    from ds_kd.eval.retrieval import read_keyed_text
    from ds_kd.data.tasks import load_split

    # held-out texts and their alignment keys (retrieval, the demo task builder, speed's --heldout)
    (tmp_path / "en").mkdir()
    (tmp_path / "alignment").mkdir()
    (tmp_path / "en" / "help.txt").write_bytes(with_bom("Open a file.\nSave it.\n"))
    (tmp_path / "alignment" / "en.tsv").write_bytes(with_bom("page.html\tp1\npage.html\tp2\n"))
    assert read_keyed_text(tmp_path, "en")[0] == (("page.html", "p1"), "Open a file.")
    assert read_language(tmp_path, "en")[0] == ("page.html", "p1", "Open a file.")
    spec = importlib.util.spec_from_file_location("speed_cli", Path(__file__).parents[2] / "launch" / "speed.py")
    speed_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed_cli)
    assert speed_cli.read_texts(tmp_path, "en")[0] == "Open a file."
    # a help page, a DeepSpeed JSON, a checkpoint's config.json, a normalised task split
    page = tmp_path / "page.html"
    page.write_bytes(with_bom('<p id="par_id1">Open a file.</p>'))
    assert parse_page(page) == [("par_id1", "Open a file.")]
    (tmp_path / "ds.json").write_bytes(with_bom('{"train_micro_batch_size_per_gpu": 4}'))
    assert load_ds_config(tmp_path / "ds.json") == {"train_micro_batch_size_per_gpu": 4}
    BertForMaskedLM(make_config("tiny-leanbert", vocab_size=50)).save_pretrained(tmp_path / "model")
    config = tmp_path / "model" / "config.json"
    config.write_bytes(BOM_BYTES + config.read_bytes())
    assert BertForMaskedLM.from_pretrained(tmp_path / "model").config.vocab_size == 50
    (tmp_path / "tasks" / "xnli").mkdir(parents=True)
    (tmp_path / "tasks" / "xnli" / "dev.en.jsonl").write_bytes(with_bom('{"id": "1", "label": "neutral"}\n'))
    assert load_split(tmp_path / "tasks", "xnli", "dev", "en") == [{"id": "1", "label": "neutral"}]
    # a brought tokenizer: BERT vocab.txt (the first token is [PAD]) and a bare tokenizer.json
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_bytes(with_bom("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n##b\n"))
    assert special_token_ids(load_existing(tmp_path / "bert", lowercase=True), "bert")["pad"] == 0
    (tmp_path / "bare").mkdir()
    tok_json = load_existing(tmp_path / "bert", lowercase=True).backend_tokenizer.to_str()
    (tmp_path / "bare" / "tokenizer.json").write_bytes(with_bom(tok_json))
    assert load_existing(tmp_path / "bare").backend_tokenizer.token_to_id("[PAD]") == 0
