"""The embedded judge and synthesiser: small, deterministic, nothing to download.

Both read the candidates document a plan's ensemble sends (JSON, schema
``modelnet.candidates/1``: ``{"schema", "input", "candidates": [{"index", "output", …}]}``)
and treat every candidate's output as data: text is compared or extracted, never obeyed.

Structured outputs (maps, lists) count by their text values (:func:`text_of`).

- ``tfidf-judge`` (task ``judge``): the medoid. Each candidate becomes a TF-IDF vector of
  its content words; the one with the highest summed cosine similarity to the others is
  the answer most of the ensemble agrees with. Ties go to the lower index. Answers
  ``{"choice": index, "scores": [...]}``.
- ``textrank-synthesis`` (task ``synthesize``): an extractive synthesis. The sentences of
  every candidate are ranked together by TextRank (:mod:`.summarize`); a sentence that
  several candidates support is central and wins. Repeated sentences are kept once.
  Param ``sentences`` (default 3). Streams the chosen sentences, in candidate order.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Mapping

from . import summarize
from .base import InvalidInput, check_param_names, int_param

CANDIDATES_SCHEMA = "modelnet.candidates/1"  # protocols.plan.CANDIDATES_SCHEMA (models import no protocols)
MAX_CANDIDATES = 64
MAX_AGGREGATOR_INPUT = 1 << 20
MAX_SYNTHESIS_SENTENCES = 50
_TOKEN = re.compile(r"[^\W_]+")


def candidate_texts(text: str) -> list[str]:
    """The candidates' outputs as text (non-text outputs as their JSON), in index order."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"the input is not a JSON candidates document: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != CANDIDATES_SCHEMA:
        raise InvalidInput(f"the input is not a candidates document (schema {CANDIDATES_SCHEMA!r})")
    candidates = document.get("candidates")
    if not isinstance(candidates, list) or not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise InvalidInput(f"'candidates' must be a list of 1..{MAX_CANDIDATES}")
    texts = []
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, dict) or "output" not in candidate:
            raise InvalidInput(f"candidate {i} has no 'output'")
        texts.append(text_of(candidate["output"]))
    return texts


def text_of(output: Any) -> str:
    """A structured output's text: its string values, one sentence each, in order (map
    keys are field names, not content); JSON if it holds no text at all."""
    leaves: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if value.strip():
                leaves.append(value.strip())
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])

    walk(output)
    if isinstance(output, str):
        return output
    return ".\n\n".join(leaves) if leaves else json.dumps(output, sort_keys=True)


def _terms(text: str) -> Counter[str]:
    return Counter(word for word in _TOKEN.findall(text.lower()) if word not in summarize.STOPWORDS)


def medoid(texts: list[str]) -> tuple[int, list[float]]:
    """The index of the text most similar to the others (TF-IDF cosine), and every score."""
    counts = [_terms(text) for text in texts]
    documents = Counter(term for count in counts for term in count)
    n = len(texts)
    vectors = []
    for count in counts:
        # Smoothed IDF: a term every candidate has still counts a little.
        vector = {term: tf * (math.log((1 + n) / (1 + documents[term])) + 1) for term, tf in count.items()}
        norm = math.sqrt(sum(value * value for value in vector.values()))
        vectors.append({term: value / norm for term, value in vector.items()} if norm else {})
    scores = []
    for i, vector in enumerate(vectors):
        total = 0.0
        for j, other in enumerate(vectors):
            if i != j:
                total += sum(value * other.get(term, 0.0) for term, value in vector.items())
        scores.append(round(total, 12))  # rounding keeps ties ties across platforms
    best = max(range(n), key=lambda i: (scores[i], -i))
    return best, scores


def judge_params(params: Mapping[str, Any]) -> None:
    check_param_names(params, ())


def judge(text: str, _: None) -> tuple[list[str], Any]:
    choice, scores = medoid(candidate_texts(text))
    return [], {"choice": choice, "scores": scores}


def synthesis_params(params: Mapping[str, Any]) -> int:
    check_param_names(params, ("sentences",))
    return int_param(params, "sentences", 3, 1, MAX_SYNTHESIS_SENTENCES)


def synthesize(text: str, count: int) -> tuple[list[str], Any]:
    merged: list[str] = []
    for candidate in candidate_texts(text):
        for sentence in summarize.split_sentences(candidate):
            if sentence not in merged:
                merged.append(sentence)
    if not merged:
        raise InvalidInput("the candidates hold no text to synthesise")
    sentences = summarize.summarize(" \n\n".join(merged), count)
    chunks = [sentence + " " for sentence in sentences[:-1]] + sentences[-1:]
    return chunks, "".join(chunks)
