"""Tiny generated task data and a tiny encoder directory (tokenizer + weights) for the fine-tuning tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NAMES = ["john", "mary", "ali", "sofia", "kenji", "priya"]
CITIES = ["paris", "rome", "delhi", "tokyo", "lima", "oslo"]
ORGS = ["acme", "globex", "initech"]
FILLERS = ["the", "a", "in", "visited", "saw", "with", "and", "today", "good", "bad", "is", "was",
           "from", "to", "fly", "cost", "play", "song", "by", "set", "alarm", "at", "weather", "for", "me"]
TIMES = ["six", "seven", "noon", "midnight"]
# Words in no vocabulary entry as a whole: they split into two sub-words ("romeville" -> rome ##ville).
SPLIT_WORDS = ["romeville", "johnson", "playing"]
SUFFIXES = ["##ville", "##son", "##ing"]


def vocab() -> list[str]:
    words = NAMES + CITIES + ORGS + FILLERS + TIMES
    return SPECIALS + sorted(set(words)) + SUFFIXES


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab())}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def make_model_dir(directory: Path, preset: str = "tiny-base", seed: int = 0) -> Path:
    """A tiny randomly initialised BertForMaskedLM export with its tokenizer."""
    import torch

    from ds_kd.models.model import BertForMaskedLM, make_config

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    BertForMaskedLM(make_config(preset, vocab_size=len(vocab()))).save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    return directory


def pair_records(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        label = rng.choice(["0", "1"])
        a = " ".join(rng.choice(NAMES + FILLERS[:8]) for _ in range(rng.randint(3, 6)))
        b = " ".join([rng.choice(NAMES), "is", "good" if label == "1" else "bad", rng.choice(CITIES)])
        out.append({"id": f"p{seed}-{i}", "text_a": a, "text_b": b, "label": label})
    return out


def tagging_records(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        tokens, tags = [], []
        for _ in range(rng.randint(2, 4)):
            choice = rng.random()
            if choice < 0.25:
                tokens += [rng.choice(NAMES), "johnson"]
                tags += ["B-PER", "I-PER"]
            elif choice < 0.5:
                tokens.append(rng.choice(CITIES + ["romeville"]))
                tags.append("B-LOC")
            elif choice < 0.65:
                tokens.append(rng.choice(ORGS))
                tags.append("B-ORG")
            else:
                tokens.append(rng.choice(FILLERS[:8] + ["playing"]))
                tags.append("O")
        out.append({"id": f"t{seed}-{i}", "tokens": tokens, "tags": tags})
    return out


def intent_slot_records(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        src, dst = rng.sample(CITIES, 2)
        if rng.random() < 0.5:
            tokens = ["fly", "from", src, "to", dst, "today"]
            slots = ["O", "O", "B-fromloc", "O", "B-toloc", "B-date"]
            intent = "flight"
        else:
            tokens = ["cost", "to", dst]
            slots = ["O", "O", "B-toloc"]
            intent = "airfare"
        out.append({"id": f"m{seed}-{i}", "tokens": tokens, "slots": slots, "intent": intent})
    return out


def parse_records(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        kind = rng.randrange(3)
        if kind == 0:
            name = rng.choice(NAMES)
            tokens = ["play", "song", "by", name]
            form = f"[IN:PLAY_MUSIC [SL:ARTIST {name} ] ]"
        elif kind == 1:
            time = rng.choice(TIMES)
            tokens = ["set", "alarm", "at", time]
            form = f"[IN:CREATE_ALARM [SL:DATE_TIME at {time} ] ]"
        else:
            city = rng.choice(CITIES)
            tokens = ["weather", "in", city, "today"]
            form = f"[IN:GET_WEATHER [SL:LOCATION {city} ] [SL:DATE_TIME today ] ]"
        out.append({"id": f"o{seed}-{i}", "tokens": tokens, "logical_form": form})
    return out


RECORDS = {"pair": pair_records, "tagging": tagging_records, "intent_slot": intent_slot_records,
           "parse": parse_records}


def write_task_data(root: Path, task: str, kind: str, langs: list[str], num_train: int = 16,
                    num_eval: int = 8) -> Path:
    """``<root>/<task>/{train,dev,test}.<lang>.jsonl``: English train/dev/test, test only for the others, and the
    ``manifest.json`` that ``python -m data_prep tasks`` writes last."""
    from ds_kd.manifest import write_manifest

    make = RECORDS[kind]
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    splits = [("train", "en", num_train), ("dev", "en", num_eval)] + [("test", lang, num_eval) for lang in langs]
    for n, (split, lang, num) in enumerate(splits):
        with open(folder / f"{split}.{lang}.jsonl", "w", encoding="utf-8") as f:
            for rec in make(num, seed=100 + n):
                f.write(json.dumps(rec) + "\n")
    write_manifest(folder, "tasks", task=task)
    return root


def make_export_dir(directory: Path, preset: str = "tiny-base", seed: int = 0) -> Path:
    """A tiny randomly initialised model written by pretraining's own export (so it carries ds-kd's record:
    segment ids never trained)."""
    import torch

    from ds_kd.models.model import BertForMaskedLM, make_config
    from ds_kd.train.training import export
    from ds_kd.schema import tokenizer_special_ids

    torch.manual_seed(seed)
    tokenizer_dir = directory.with_name(directory.name + "-tokenizer")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(str(tokenizer_dir))
    return export(BertForMaskedLM(make_config(preset, vocab_size=len(vocab()))), tokenizer_dir, directory,
                  tokenizer_special_ids(tokenizer))


def broken_model_dirs(root: Path) -> dict[str, Path]:
    """Model directories every loading command must refuse: ``bare`` has no tokenizer files, ``small`` a tokenizer
    with more ids than its embedding rows (20)."""
    from ds_kd.models.model import BertForMaskedLM, make_config

    bare = root / "bare"
    BertForMaskedLM(make_config("tiny-leanbert", vocab_size=len(vocab()))).save_pretrained(bare)
    small = root / "small"
    BertForMaskedLM(make_config("tiny-leanbert", vocab_size=20)).save_pretrained(small)
    make_tokenizer().save_pretrained(str(small))
    return {"bare": bare, "small": small}
