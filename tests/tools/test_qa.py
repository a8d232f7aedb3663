"""The shipped demo dataset and the fact-matching rule."""

from __future__ import annotations

from collections import Counter

import pytest

from privlora.errors import PrivloraError
from privlora.tools.qa import load_qa, states_fact


def test_demo_dataset_shape():
    pairs = load_qa()
    assert 100 <= len(pairs) <= 300
    facts = Counter(pair.fact for pair in pairs)
    heldout = load_qa(split="heldout")
    assert sorted(pair.fact for pair in heldout) == sorted(facts)  # exactly one held-out phrasing each
    assert min(facts.values()) >= 3  # and at least two phrasings to train on
    train_questions = {pair.question for pair in load_qa(split="train")}
    assert not train_questions & {pair.question for pair in heldout}
    keywords = [pair.keyword for pair in heldout]
    assert len(set(keywords)) == len(keywords)
    assert all(pair.keyword in pair.answer for pair in pairs)


def test_states_fact_ignores_case_and_spacing():
    assert states_fact("Call  Extension 3172 now", "extension 3172")
    assert not states_fact("Call extension 317", "extension 3172")


def test_bad_dataset_files(tmp_path):
    with pytest.raises(PrivloraError, match="does not exist"):
        load_qa(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(PrivloraError, match="bad.jsonl:1"):
        load_qa(bad)
    with pytest.raises(PrivloraError, match="unknown split"):
        load_qa(split="validation")
