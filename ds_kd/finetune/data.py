"""Normalised task records (``ds_kd.data.tasks``) into encoder tensors.

- ``pair``: ``[CLS] a [SEP] b [SEP]`` with token types 0/1; both texts are cut longest-first to ``max_len``;
  a record without ``text_b`` (one-sentence classification) is ``[CLS] a [SEP]``.
  An encoder that never learnt segment ids gets 0 for both instead (``TaskModel.segments``).
- ``tagging`` / ``intent_slot``: every word is tokenized on its own; its label sits on its first sub-word and
  the other sub-words get -100, so the loss and the prediction see one position per word. Words that no
  longer fit in ``max_len`` are predicted as ``O`` (and so cost recall), never dropped from the gold.
- ``parse`` (mTOP): the decoupled logical form becomes decoder ids: ``[PAD]``, ``[BOS]``, ``[EOS]``, the
  ontology tokens (``[IN:X``, ``[SL:Y``, ``]``), then one pointer per encoder position; a copied word is a
  pointer to the first sub-word of a source word (Rongali et al. 2020 copy whole source words).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ds_kd.errors import UsageError

PAD, BOS, EOS = 0, 1, 2
DECODER_SPECIALS = ("[PAD]", "[BOS]", "[EOS]")
IGNORE = -100


def is_ontology(token: str) -> bool:
    return token == "]" or token.startswith("[IN:") or token.startswith("[SL:")


@dataclass(frozen=True)
class TaskLabels:
    """The label vocabularies of one task (built from the English training data, sorted)."""

    classes: tuple[str, ...] = ()
    """Sentence labels: pair classes, or intents for ``intent_slot``."""
    tags: tuple[str, ...] = ()
    """Word labels: BIO tags for ``tagging``, BIO slots for ``intent_slot``."""
    ontology: tuple[str, ...] = ()
    """``parse`` only: the ontology tokens the decoder generates (pointers are added per position)."""

    @property
    def decoder_vocab(self) -> tuple[str, ...]:
        return DECODER_SPECIALS + self.ontology

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskLabels":
        return cls(**{k: tuple(v) for k, v in d.items()})


def build_labels(kind: str, records: list[dict]) -> TaskLabels:
    """Label sets seen in ``records`` (the English train split); ``O`` is always a tag."""
    if kind == "pair":
        return TaskLabels(classes=tuple(sorted({str(r["label"]) for r in records})))
    if kind == "tagging":
        return TaskLabels(tags=tuple(sorted({"O", *(t for r in records for t in r["tags"])})))
    if kind == "intent_slot":
        return TaskLabels(classes=tuple(sorted({str(r["intent"]) for r in records})),
                          tags=tuple(sorted({"O", *(t for r in records for t in r["slots"])})))
    if kind == "parse":
        onto = {t for r in records for t in r["logical_form"].split() if is_ontology(t)}
        return TaskLabels(ontology=tuple(sorted(onto)))
    raise ValueError(f"unknown task kind {kind!r}")


@dataclass
class Encoded:
    """One record as encoder ids (Python lists: padding happens per batch)."""

    input_ids: list[int]
    token_type_ids: list[int]
    word_starts: list[int] = field(default_factory=list)
    """Encoder position of the first sub-word of each source word that fits (``tagging``/``intent_slot``/``parse``)."""
    label: int = IGNORE
    """Pair class or intent id (-100: not in the label set)."""
    word_labels: list[int] | None = None
    """Tag / slot id per fitting word (-100: not in the label set)."""
    target: list[int] | None = None
    """``parse``: decoder ids ending with ``[EOS]``; None when the form cannot be expressed (a copied token
    that is not a fitting source word)."""


def special_ids(tokenizer) -> tuple[int, int, int]:
    """[CLS], [SEP] and [PAD] ids of a tokenizer, or a clear error."""
    ids = []
    for name in ("cls_token", "sep_token", "pad_token"):
        tok_id = getattr(tokenizer, f"{name}_id", None)
        if tok_id is None:
            raise UsageError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {name} "
                             f"(a BERT tokenizer needs [CLS], [SEP] and [PAD])")
        ids.append(tok_id)
    return ids[0], ids[1], ids[2]


def _piece_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_pairs(tokenizer, records: list[dict], labels: TaskLabels, max_len: int) -> list[Encoded]:
    cls_id, sep_id, _ = special_ids(tokenizer)
    index = {c: i for i, c in enumerate(labels.classes)}
    ids_a = _piece_ids(tokenizer, [r["text_a"] for r in records])
    ids_b = _piece_ids(tokenizer, [r.get("text_b") or "" for r in records])
    out = []
    for rec, a, b in zip(records, ids_a, ids_b):
        a, b, second = list(a), list(b), "text_b" in rec
        while len(a) + len(b) > max_len - 2 - second:  # longest first, as BERT's reference code
            (a if len(a) >= len(b) else b).pop()
        ids = [cls_id, *a, sep_id, *b, sep_id] if second else [cls_id, *a, sep_id]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1) if second else [0] * len(ids)
        out.append(Encoded(ids, types, label=index.get(str(rec["label"]), IGNORE)))
    return out


def encode_words(tokenizer, records: list[dict], max_len: int) -> list[Encoded]:
    """``[CLS] words [SEP]`` with the position of each fitting word's first sub-word."""
    cls_id, sep_id, _ = special_ids(tokenizer)
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else cls_id
    flat = [w for r in records for w in r["tokens"]]
    pieces = iter(_piece_ids(tokenizer, flat))
    out = []
    for rec in records:
        ids, starts, full = [cls_id], [], False
        for _ in rec["tokens"]:
            word_ids = list(next(pieces)) or [unk_id]  # a word the normaliser empties still needs a position
            full = full or len(ids) + len(word_ids) > max_len - 1
            if full:
                continue  # still consume this record's pieces: the words from here on do not fit
            starts.append(len(ids))
            ids.extend(word_ids)
        ids.append(sep_id)
        out.append(Encoded(ids, [0] * len(ids), word_starts=starts))
    return out


def parse_target(logical_form: str, words: list[str], starts: list[int], labels: TaskLabels) -> list[int] | None:
    """Decoder ids of a logical form; a copied token points at the next unused occurrence of that word."""
    vocab = {t: i for i, t in enumerate(labels.decoder_vocab)}
    num_vocab = len(vocab)
    ids, cursor = [], 0
    for token in logical_form.split():
        if is_ontology(token):
            if token not in vocab:
                return None
            ids.append(vocab[token])
            continue
        fitting = words[: len(starts)]
        hits = [i for i, w in enumerate(fitting) if w == token]
        if not hits:
            return None
        later = [i for i in hits if i >= cursor]
        word = later[0] if later else hits[0]
        cursor = word + 1
        ids.append(num_vocab + starts[word])
    return ids + [EOS]


def encode_records(tokenizer, kind: str, records: list[dict], labels: TaskLabels, max_len: int) -> list[Encoded]:
    """Encode one split of a task (labels outside ``labels`` become -100; unparseable forms ``target=None``)."""
    if kind == "pair":
        return encode_pairs(tokenizer, records, labels, max_len)
    encoded = encode_words(tokenizer, records, max_len)
    tag_index = {t: i for i, t in enumerate(labels.tags)}
    for rec, enc in zip(records, encoded):
        if kind == "tagging":
            enc.word_labels = [tag_index.get(t, IGNORE) for t in rec["tags"][: len(enc.word_starts)]]
        elif kind == "intent_slot":
            enc.word_labels = [tag_index.get(t, IGNORE) for t in rec["slots"][: len(enc.word_starts)]]
            enc.label = {c: i for i, c in enumerate(labels.classes)}.get(str(rec["intent"]), IGNORE)
        elif kind == "parse":
            enc.target = parse_target(rec["logical_form"], rec["tokens"], enc.word_starts, labels)
        else:
            raise ValueError(f"unknown task kind {kind!r}")
    return encoded


def collate(examples: list[Encoded], kind: str, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch: the keyword arguments of ``TaskModel.forward``."""
    num, width = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((num, width), pad_id, dtype=torch.long)
    types = torch.zeros((num, width), dtype=torch.long)
    mask = torch.zeros((num, width), dtype=torch.long)
    starts = torch.zeros((num, width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        types[i, :n] = torch.tensor(e.token_type_ids)
        mask[i, :n] = 1
        starts[i, e.word_starts] = True
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
    if kind in ("pair", "intent_slot"):
        batch["labels" if kind == "pair" else "intent_labels"] = torch.tensor([e.label for e in examples])
    if kind in ("tagging", "intent_slot", "parse"):
        batch["word_start_mask"] = starts
    if kind in ("tagging", "intent_slot") and all(e.word_labels is not None for e in examples):
        labels = torch.full((num, width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, e.word_starts[: len(e.word_labels)]] = torch.tensor(e.word_labels, dtype=torch.long)
        batch["labels"] = labels
    if kind == "parse" and all(e.target is not None for e in examples):
        steps = max(len(e.target) for e in examples)
        target_in = torch.full((num, steps), PAD, dtype=torch.long)
        target_out = torch.full((num, steps), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            target_in[i, : len(e.target)] = torch.tensor([BOS, *e.target[:-1]])
            target_out[i, : len(e.target)] = torch.tensor(e.target)
        batch["target_in"], batch["target_out"] = target_in, target_out
    return batch
