"""The answer normalization of the metrics and of the `"appearance"` order, and where a normalized answer occurs in a
normalized text.

Normalization is SQuAD's, made Unicode-aware: NFKC, lowercase, drop punctuation (Unicode category P*), drop the
articles a/an/the, collapse whitespace. Text it would empty (`"the"`, `"..."`) keeps its lowercased,
whitespace-collapsed form, so it still only matches itself.
"""

from __future__ import annotations

import re
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD normalization, Unicode-aware; text it would empty keeps its lowercased, whitespace-collapsed form."""
    lowered = unicodedata.normalize("NFKC", text).lower()
    no_punct = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in lowered)
    normalized = " ".join(_ARTICLES.sub(" ", no_punct).split())
    return normalized or " ".join(lowered.split())


def first_occurrence(answer: str, text: str) -> int | None:
    """The character offset in `text` where `answer` first occurs on word boundaries, or None; both normalized.

    Normalized text separates its words by single spaces, so a word boundary is a space or an end:
    `first_occurrence("new york", "flights to new york")` is 11, `first_occurrence("york", "yorkshire")` is None.
    """
    found = f" {text} ".find(f" {answer} ")
    return None if found < 0 or not answer else found
