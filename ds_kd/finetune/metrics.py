"""The paper's metrics (§4), as fractions in [0, 1] (tables print them ×100).

- :func:`accuracy`: XNLI, PAWS-X.
- :func:`span_f1`: WikiANN, MultiATIS++ slots. Entity-level micro precision/recall/F1 by ``seqeval`` in its
  default, conlleval-compatible mode (not ``mode="strict"``): an ``I-X`` that does not continue an ``X`` entity
  (after ``O``, at the start, or after another type) starts a new entity, as conlleval and XTREME count it. With
  no gold and no predicted entity at all, F1 is 0.0 (seqeval's and conlleval's convention).
- :func:`intent_slot_scores`: MultiATIS++ intent accuracy, slot F1 and exact match, an utterance counting as
  exact when its intent and its whole slot-label sequence equal the gold ones.
- :func:`logical_form_exact_match`: mTOP, the whitespace-normalised logical forms compared as strings.

:func:`score` picks the metrics for a task kind of :mod:`ds_kd.data.tasks` from gold records and predictions.
"""
from __future__ import annotations

from typing import Any, Sequence

from seqeval.metrics import f1_score, precision_score, recall_score


def _check_lengths(gold: Sequence, pred: Sequence, what: str) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{what}: {len(gold)} gold items but {len(pred)} predictions")
    if not gold:
        raise ValueError(f"{what}: no examples to score")


def accuracy(gold: Sequence[Any], pred: Sequence[Any]) -> float:
    """Fraction of positions where ``pred`` equals ``gold``."""
    _check_lengths(gold, pred, "accuracy")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def span_f1(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level ``{"precision", "recall", "f1"}`` of BIO tag sequences (conlleval-compatible seqeval)."""
    _check_lengths(gold_tags, pred_tags, "span_f1")
    for i, (g, p) in enumerate(zip(gold_tags, pred_tags)):
        if len(g) != len(p):
            raise ValueError(f"span_f1: sentence {i} has {len(g)} gold tags but {len(p)} predicted tags")
    gold, pred = [list(g) for g in gold_tags], [list(p) for p in pred_tags]
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
    }


def intent_slot_scores(gold_intents: Sequence[str], gold_slots: Sequence[Sequence[str]],
                       pred_intents: Sequence[str], pred_slots: Sequence[Sequence[str]]) -> dict[str, float]:
    """MultiATIS++: ``{"intent_accuracy", "slot_precision", "slot_recall", "slot_f1", "exact_match"}``."""
    _check_lengths(gold_intents, pred_intents, "intent_slot_scores")
    _check_lengths(gold_slots, gold_intents, "intent_slot_scores (gold slots vs intents)")
    slots = span_f1(gold_slots, pred_slots)
    exact = [gi == pi and list(gs) == list(ps)
             for gi, pi, gs, ps in zip(gold_intents, pred_intents, gold_slots, pred_slots)]
    return {
        "intent_accuracy": accuracy(gold_intents, pred_intents),
        "slot_precision": slots["precision"],
        "slot_recall": slots["recall"],
        "slot_f1": slots["f1"],
        "exact_match": sum(exact) / len(exact),
    }


def normalise_logical_form(form: str) -> str:
    """Single spaces between tokens, none at the ends."""
    return " ".join(form.split())


def logical_form_exact_match(gold: Sequence[str], pred: Sequence[str]) -> float:
    """mTOP: fraction of predicted logical forms equal to the gold ones after whitespace normalisation."""
    _check_lengths(gold, pred, "logical_form_exact_match")
    return sum(normalise_logical_form(g) == normalise_logical_form(p) for g, p in zip(gold, pred)) / len(gold)


def _field(prediction: Any, key: str) -> Any:
    """A prediction is either the bare value or a record-like dict holding it under ``key``."""
    return prediction[key] if isinstance(prediction, dict) else prediction


def score(kind: str, gold_records: Sequence[dict], predictions: Sequence[Any]) -> dict[str, float]:
    """Metrics of one task kind; the result always holds the task's headline metric key (``TaskSpec.metric``).

    ``gold_records``: records as :func:`ds_kd.data.tasks.load_split` returns them. ``predictions``, one per record:
    - ``pair``: the label (or ``{"label": ...}``)            -> ``{"accuracy"}``
    - ``tagging``: the tag list (or ``{"tags": [...]}``)       -> ``{"precision", "recall", "f1"}``
    - ``intent_slot``: ``{"intent": str, "slots": [...]}``     -> ``{"intent_accuracy", "slot_precision",
      "slot_recall", "slot_f1", "exact_match"}``
    - ``parse``: the logical form (or ``{"logical_form": ...}``) -> ``{"exact_match"}``
    """
    _check_lengths(gold_records, predictions, f"score({kind})")
    if kind == "pair":
        return {"accuracy": accuracy([r["label"] for r in gold_records],
                                     [_field(p, "label") for p in predictions])}
    if kind == "tagging":
        return span_f1([r["tags"] for r in gold_records], [_field(p, "tags") for p in predictions])
    if kind == "intent_slot":
        return intent_slot_scores([r["intent"] for r in gold_records], [r["slots"] for r in gold_records],
                                  [p["intent"] for p in predictions], [p["slots"] for p in predictions])
    if kind == "parse":
        return {"exact_match": logical_form_exact_match([r["logical_form"] for r in gold_records],
                                                        [_field(p, "logical_form") for p in predictions])}
    raise ValueError(f"unknown task kind {kind!r}; expected pair, tagging, intent_slot or parse")
