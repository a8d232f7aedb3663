"""Question/answer datasets for fine-tuning and for checking that an adapter learned its facts.

The shipped demo dataset (``privlora/data/clinic_qa.jsonl``) holds invented internal facts of a
fictional clinic: 70 facts, each asked four ways; three phrasings are for training and the fourth
is held out, so evaluation asks questions the model never saw verbatim.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from privlora.errors import PrivloraError

SPLITS = ("train", "heldout")
FIELDS = ("id", "fact", "split", "question", "answer", "keyword")


@dataclass(frozen=True)
class QAPair:
    id: str
    fact: str
    split: str
    question: str
    answer: str
    keyword: str  # the part of the answer that proves the fact is known


def demo_dataset_path() -> Path:
    return Path(str(resources.files("privlora") / "data" / "clinic_qa.jsonl"))


def load_qa(path: str | Path | None = None, split: str | None = None) -> list[QAPair]:
    """Read a JSON Lines QA file (default: the demo dataset), optionally one split only."""
    path = Path(path) if path is not None else demo_dataset_path()
    if split is not None and split not in SPLITS:
        raise PrivloraError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if not path.is_file():
        raise PrivloraError(f"dataset {path} does not exist")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pair = QAPair(**{name: str(record[name]) for name in FIELDS})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PrivloraError(f"{path}:{number}: expected a JSON object with {', '.join(FIELDS)} ({exc})") from None
        if split is None or pair.split == split:
            pairs.append(pair)
    return pairs


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def states_fact(answer: str, keyword: str) -> bool:
    """Whether a generated answer contains the fact's keyword (case and spacing ignored)."""
    return _normalise(keyword) in _normalise(answer)
