"""The paper's metrics against hand-computed cases, seqeval's edge cases included."""
from __future__ import annotations

import pytest

from ds_kd.finetune.metrics import accuracy, intent_slot_scores, logical_form_exact_match, score, span_f1
from ds_kd.data.tasks import TASKS


def test_accuracy_hand_computed():
    assert accuracy(["a", "b", "c", "a"], ["a", "b", "a", "a"]) == 0.75
    with pytest.raises(ValueError, match="3 gold items but 2 predictions"):
        accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def prf(gold, pred):
    s = span_f1(gold, pred)
    return pytest.approx((s["precision"], s["recall"], s["f1"]))


@pytest.mark.parametrize("gold, pred, expected", [
    # one of two entities found, nothing spurious: P 1, R 1/2, F 2/3
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]], (1.0, 0.5, 2 / 3)),
    # micro average over sentences: 1 of 2 predicted spans right, 1 of 2 gold spans found
    ([["B-PER", "O"], ["B-LOC", "I-LOC"]], [["B-PER", "O"], ["B-LOC", "O"]], (0.5, 0.5, 0.5)),
    # I- without B- at the start begins an entity (conlleval), so this span matches
    ([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]], (1.0, 1.0, 1.0)),
    # I- after O begins an entity too
    ([["O", "B-LOC", "I-LOC"]], [["O", "I-LOC", "I-LOC"]], (1.0, 1.0, 1.0)),
    # a type change inside a span splits it: predicted PER(0) and LOC(1) against gold PER(0-1)
    ([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]], (0.0, 0.0, 0.0)),
    # ... which is right where gold has two entities of different types
    ([["B-PER", "B-LOC"]], [["B-PER", "I-LOC"]], (1.0, 1.0, 1.0)),
    # B- B- of one type is two entities; B- I- is one: no match
    ([["B-PER", "B-PER"]], [["B-PER", "I-PER"]], (0.0, 0.0, 0.0)),
    # empty prediction (all O) against gold entities: P 0 (no predictions), R 0, F 0
    ([["B-PER", "O"]], [["O", "O"]], (0.0, 0.0, 0.0)),
    # spurious entity against all-O gold
    ([["O", "O"]], [["B-ORG", "O"]], (0.0, 0.0, 0.0)),
    # all O on both sides: no entity at all; F1 is 0.0 by seqeval's and conlleval's convention
    ([["O", "O"], ["O"]], [["O", "O"], ["O"]], (0.0, 0.0, 0.0)),
])
def test_span_f1_hand_computed_and_edge_cases(gold, pred, expected):
    assert prf(gold, pred) == expected


def test_span_f1_rejects_tag_count_mismatch():
    with pytest.raises(ValueError, match="sentence 1 has 2 gold tags but 1 predicted"):
        span_f1([["O"], ["O", "O"]], [["O"], ["O"]])


def test_intent_slot_scores_hand_computed():
    gold_intents = ["atis_flight", "atis_airfare", "atis_flight", "atis_flight#atis_airfare"]
    gold_slots = [["B-a", "O"], ["B-b"], ["O", "B-c"], ["O"]]
    pred_intents = ["atis_flight", "atis_airfare", "atis_airline", "atis_flight#atis_airfare"]
    pred_slots = [["B-a", "O"], ["O"], ["O", "B-c"], ["O"]]
    s = intent_slot_scores(gold_intents, gold_slots, pred_intents, pred_slots)
    assert s["intent_accuracy"] == 0.75  # the third intent is wrong
    assert s["exact_match"] == 0.5  # 1 and 4; 2 misses a slot, 3 the intent
    assert (s["slot_precision"], s["slot_recall"]) == pytest.approx((1.0, 2 / 3))
    assert s["slot_f1"] == pytest.approx(0.8)


def test_exact_match_compares_whole_slot_sequences():
    # an ill-formed I- start counts as the same span for F1, but the slot labels are not all right
    s = intent_slot_scores(["x"], [["B-a", "I-a"]], ["x"], [["I-a", "I-a"]])
    assert s["slot_f1"] == 1.0 and s["exact_match"] == 0.0


def test_logical_form_exact_match_normalises_whitespace_only():
    gold = ["[IN:A [SL:B x y ] ]", "[IN:A [SL:B x ] ]", "[IN:C ]"]
    pred = [" [IN:A  [SL:B x\ty ] ] ", "[IN:A [SL:B X ] ]", "[IN:C"]
    assert logical_form_exact_match(gold, pred) == pytest.approx(1 / 3)


def test_score_gives_each_task_its_headline_metric():
    pair = [{"id": "1", "text_a": "a", "text_b": "b", "label": "0"}, {"id": "2", "text_a": "c", "text_b": "d",
                                                                     "label": "1"}]
    tagging = [{"id": "1", "tokens": ["Paris", "is"], "tags": ["B-LOC", "O"]}]
    intent_slot = [{"id": "1", "tokens": ["to", "dallas"], "slots": ["O", "B-to"], "intent": "atis_flight"}]
    parse = [{"id": "1", "tokens": ["wake", "me"], "logical_form": "[IN:A [SL:B me ] ]"}]
    results = {
        "xnli": score("pair", pair, ["0", "0"]),
        "wikiann": score("tagging", tagging, [["B-LOC", "O"]]),
        "matis": score("intent_slot", intent_slot, [{"intent": "atis_flight", "slots": ["O", "B-to"]}]),
        "mtop": score("parse", parse, ["[IN:A [SL:B me ] ]"]),
    }
    assert results["xnli"] == {"accuracy": 0.5}
    assert results["wikiann"]["f1"] == 1.0
    assert results["matis"]["exact_match"] == 1.0 and results["matis"]["intent_accuracy"] == 1.0
    assert results["mtop"] == {"exact_match": 1.0}
    for task, result in results.items():
        assert TASKS[task].metric in result
    # predictions may also be record-like dicts
    assert score("pair", pair, [{"label": "0"}, {"label": "1"}]) == {"accuracy": 1.0}
    assert score("parse", parse, [{"logical_form": "[IN:A ]"}]) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="unknown task kind"):
        score("ranking", pair, ["0", "1"])
    with pytest.raises(ValueError, match="2 gold items but 1 predictions"):
        score("pair", pair, ["0"])
