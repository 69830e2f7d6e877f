"""An extractive summariser: TextRank (Mihalcea & Tarau, 2004) in pure Python.

Sentences are the vertices of a graph; two sentences are linked by how many content words
they share, normalised by their lengths. Weighted PageRank by power iteration ranks them,
and the best ``count`` are returned in document order. Deterministic: ties go to the
earlier sentence, so a text without any shared words summarises to its lead.
"""

from __future__ import annotations

import math
import re

DAMPING = 0.85  # PageRank's usual damping factor
TOLERANCE = 1e-9  # stop when the L1 change of the scores falls below this
MAX_ITERATIONS = 200  # a symmetric graph converges in far fewer; this only bounds the loop

# Enough English function words that overlap means shared content, not shared grammar.
STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    may might must shall us one two many much every another within without upon via per yet
    """.split()
)

# Abbreviations whose full stop does not end a sentence (lower-case, without the last dot).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e a.m p.m cf fig no inc ltd co approx dept est jan feb mar "
    "apr jun jul aug sep sept oct nov dec".split()
)

# Terminal punctuation (with closing quotes/brackets) then whitespace, or a blank line.
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|\n\s*\n")
_LAST_WORD = re.compile(r"(\S+)\.$")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, stripped, in order; never empty for non-blank text."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start : match.end()].strip()
        if match.group().startswith(".") and _ends_with_abbreviation(candidate):
            continue
        if candidate:
            sentences.append(candidate)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _ends_with_abbreviation(sentence: str) -> bool:
    match = _LAST_WORD.search(sentence)
    if match is None:
        return False
    word = match.group(1).lower().lstrip("\"'(\u201c\u2018[")
    # A single letter is an initial ("J. Smith"), not the end of a sentence.
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def content_words(sentence: str) -> frozenset[str]:
    """Lower-cased non-stopwords, with possessives and plain plurals folded."""
    words = set()
    for word in _WORD.findall(sentence.lower()):
        word = word.removesuffix("'s")
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if len(word) > 1 and word not in STOPWORDS:
            words.add(word)
    return frozenset(words)


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """TextRank's overlap: shared words over the sum of log lengths (+1 so one-word works)."""
    shared = len(a & b)
    if not shared:
        return 0.0
    return shared / (math.log(len(a) + 1) + math.log(len(b) + 1))


def pagerank(edges: list[dict[int, float]]) -> list[float]:
    """Weighted PageRank of a graph given as out-edge weights per vertex; scores sum to 1.

    A vertex without edges spreads its score evenly (the usual dangling-node rule), so
    isolated sentences rank below connected ones but the iteration stays stochastic.
    """
    n = len(edges)
    if n == 0:
        return []
    totals = [sum(row.values()) for row in edges]
    scores = [1.0 / n] * n
    for _ in range(MAX_ITERATIONS):
        dangling = sum(score for score, total in zip(scores, totals) if not total)
        new = [(1.0 - DAMPING) / n + DAMPING * dangling / n] * n
        for j, row in enumerate(edges):
            if totals[j]:
                share = DAMPING * scores[j] / totals[j]
                for i, weight in row.items():
                    new[i] += share * weight
        change = sum(abs(a - b) for a, b in zip(new, scores))
        scores = new
        if change < TOLERANCE:
            break
    return scores


def summarize(text: str, count: int = 3) -> list[str]:
    """The ``count`` most central sentences of ``text``, in document order."""
    sentences = split_sentences(text)
    if len(sentences) <= count:
        return sentences
    words = [content_words(sentence) for sentence in sentences]
    edges: list[dict[int, float]] = [{} for _ in sentences]
    for i in range(len(sentences)):
        for j in range(i + 1, len(sentences)):
            weight = similarity(words[i], words[j])
            if weight:
                edges[i][j] = edges[j][i] = weight
    scores = pagerank(edges)
    best = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:count]
    return [sentences[i] for i in sorted(best)]
