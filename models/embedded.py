"""The default models every node can serve offline, and the echo backend for tests.

``EmbeddedBackend`` serves small CPU models whose data ships inside their packages or
this module: VADER sentiment, langid language identification, YAKE keywords, our own
TextRank summariser, a feature-hashing text embedder, and two aggregators for plans (a
judge and a synthesiser, models/aggregators.py). Heavy state (langid's model takes ~1.4 s to decode) is loaded once per process,
lazily and under a lock, by whichever call needs it first, so with ``offload=True`` the load
also happens off the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import trio

from . import aggregators, summarize
from .base import (
    Backend,
    Chunk,
    InvalidInput,
    ModelError,
    ModelInfo,
    Output,
    UnknownModel,
    check_param_names,
    check_text,
    int_param,
    str_param,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

SENTIMENT_THRESHOLD = 0.05  # VADER's published cut-off on the compound score
MAX_KEYWORDS = 50
MAX_SUMMARY_SENTENCES = 50


class _Lazy(Generic[T]):
    """A value built once, on first use, by whichever thread gets there first."""

    def __init__(self, what: str, load: Callable[[], T]) -> None:
        self.what = what
        self.seconds: float | None = None  # load time, once loaded
        self._load = load
        self._value: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    start = time.perf_counter()
                    self._value = self._load()
                    self.seconds = time.perf_counter() - start
                    logger.info("loaded %s in %.3f s", self.what, self.seconds)
                value = self._value
        return value


def _load_vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _load_langid() -> Any:
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def _load_yake() -> Any:
    import yake

    return yake


_vader = _Lazy("VADER lexicon", _load_vader)
_langid = _Lazy("langid model", _load_langid)
_yake = _Lazy("yake", _load_yake)
_stopwords_lock = threading.Lock()
_stopwords: dict[str, frozenset[str]] = {}


@functools.cache
def _yake_stopwords_dir() -> str:
    # Found without importing yake (0.2 s), so a params check stays cheap on the event loop.
    spec = importlib.util.find_spec("yake")
    if spec is None or spec.origin is None:
        raise ModelError("the yake package is not installed")
    return os.path.join(os.path.dirname(spec.origin), "core", "StopwordsList")


@functools.cache
def yake_languages() -> frozenset[str]:
    """Language codes YAKE has a stopword list for."""
    names = os.listdir(_yake_stopwords_dir())
    found = (re.fullmatch(r"stopwords_([a-z]{2})\.txt", name) for name in names)
    return frozenset(match.group(1) for match in found if match)


def _yake_stopwords(language: str) -> frozenset[str]:
    with _stopwords_lock:
        words = _stopwords.get(language)
        if words is None:
            path = os.path.join(_yake_stopwords_dir(), f"stopwords_{language}.txt")
            with open(path, encoding="utf-8", errors="replace") as file:
                words = frozenset(file.read().lower().split())
            _stopwords[language] = words
        return words


# --- the five models: a params check (inline, cheap) and a compute (CPU, maybe a thread) ---
# compute returns (chunks, output value); non-streaming models return no chunks.


def _sentiment_params(params: Mapping[str, Any]) -> None:
    check_param_names(params, ())


def _sentiment(text: str, _: None) -> tuple[list[str], Any]:
    scores = _vader().polarity_scores(text)
    compound = float(scores["compound"])
    if compound >= SENTIMENT_THRESHOLD:
        label = "positive"
    elif compound <= -SENTIMENT_THRESHOLD:
        label = "negative"
    else:
        label = "neutral"
    value = {"label": label, "compound": compound}
    value.update({key: float(scores[key]) for key in ("pos", "neu", "neg")})
    return [], value


def _language_params(params: Mapping[str, Any]) -> tuple[str, ...] | None:
    check_param_names(params, ("candidates",))
    candidates = params.get("candidates")
    if candidates is None:
        return None
    if isinstance(candidates, str):
        codes = tuple(code.strip() for code in candidates.split(","))
    elif isinstance(candidates, (list, tuple)) and all(isinstance(code, str) for code in candidates):
        codes = tuple(code.strip() for code in candidates)
    else:
        raise InvalidInput("parameter 'candidates' must be a comma-separated list of language codes")
    codes = tuple(dict.fromkeys(code for code in codes if code))
    if not codes:
        raise InvalidInput("parameter 'candidates' names no language")
    return codes


def _language(text: str, candidates: tuple[str, ...] | None) -> tuple[list[str], Any]:
    identifier = _langid()
    languages = list(identifier.nb_classes)
    # Restrict by slicing the full model's log-probabilities: set_languages() would mutate
    # the shared identifier under other threads.
    log_probs = identifier.nb_classprobs(identifier.instance2fv(text))
    if candidates is not None:
        unknown = [code for code in candidates if code not in languages]
        if unknown:
            known = " ".join(sorted(languages))
            raise InvalidInput(f"unknown language codes {unknown}; langid knows: {known}")
        indexes = [languages.index(code) for code in candidates]
        languages = [languages[i] for i in indexes]
        log_probs = log_probs[indexes]
    probs = identifier.norm_probs(log_probs)
    best = int(probs.argmax())
    return [], {"language": str(languages[best]), "confidence": min(1.0, max(0.0, float(probs[best])))}


def _keyword_params(params: Mapping[str, Any]) -> tuple[int, str]:
    check_param_names(params, ("top", "language"))
    top = int_param(params, "top", 5, 1, MAX_KEYWORDS)
    language = str_param(params, "language", "en")
    if language not in yake_languages():
        known = " ".join(sorted(yake_languages()))
        raise InvalidInput(f"YAKE has no stopwords for {language!r}; known: {known}")
    return top, language


def _keywords(text: str, args: tuple[int, str]) -> tuple[list[str], Any]:
    top, language = args
    extractor = _yake().KeywordExtractor(lan=language, top=top, stopwords=_yake_stopwords(language))
    found = extractor.extract_keywords(text)
    # YAKE scores: lower is more relevant; the list comes best first.
    return [], {"keywords": [{"keyword": str(keyword), "score": float(score)} for keyword, score in found]}


def _summary_params(params: Mapping[str, Any]) -> int:
    check_param_names(params, ("sentences",))
    return int_param(params, "sentences", 3, 1, MAX_SUMMARY_SENTENCES)


def _summary(text: str, count: int) -> tuple[list[str], Any]:
    sentences = summarize.summarize(text, count)
    # A space after every sentence but the last, so the chunks join into the summary.
    chunks = [sentence + " " for sentence in sentences[:-1]] + sentences[-1:]
    return chunks, "".join(chunks)


EMBEDDING_DIMENSIONS = 256
_WORD = re.compile(r"\w+")


def hashed_embedding(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic, download-free text embedding, L2-normalised.

    Term frequencies of the lowercased words and of their character 3-grams (with ``<``
    and ``>`` marking word edges, so ``cat`` and ``cats`` share most features), hashed
    into ``dimensions`` buckets with a hashed sign (collisions cancel out instead of piling
    up), with sublinear (1 + log) weighting. BLAKE2b, not ``hash()``: the same text must
    give the same vector in every process. Texts that share words point the same way.
    """
    counts: dict[str, int] = {}
    for word in _WORD.findall(text.lower()):
        counts["w:" + word] = counts.get("w:" + word, 0) + 1
        marked = f"<{word}>"
        for start in range(len(marked) - 2):
            gram = "c:" + marked[start : start + 3]
            counts[gram] = counts.get(gram, 0) + 1
    vector = [0.0] * dimensions
    for feature, count in counts.items():
        digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
        weight = 1.0 + math.log(count)
        vector[digest % dimensions] += weight if digest >> 63 else -weight
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


def _embed_params(params: Mapping[str, Any]) -> int:
    check_param_names(params, ("dimensions",))
    return int_param(params, "dimensions", EMBEDDING_DIMENSIONS, 1, 4096)


def _embed(text: str, dimensions: int) -> tuple[list[str], Any]:
    return [], hashed_embedding(text, dimensions)


@dataclasses.dataclass(frozen=True, slots=True)
class _Model:
    info: ModelInfo
    check: Callable[[Mapping[str, Any]], Any]  # params -> parsed arguments, or InvalidInput
    compute: Callable[[str, Any], tuple[list[str], Any]]  # thread-safe CPU work
    loader: _Lazy[Any] | None  # what it loads once, for load_seconds


EMBEDDED_MODELS: dict[str, _Model] = {
    model.info.name: model
    for model in (
        _Model(
            ModelInfo(
                "vader-sentiment",
                "sentiment",
                ("english", "lexicon", "social-media"),
                "VADER lexicon and rules: label positive/negative/neutral (compound +-0.05), "
                "compound, pos, neu, neg.",
            ),
            _sentiment_params,
            _sentiment,
            _vader,
        ),
        _Model(
            ModelInfo(
                "langid",
                "language-id",
                ("multilingual", "naive-bayes"),
                "langid.py: ISO 639-1 language of the text among 97, with a normalised "
                "confidence; param candidates='en,fr,de' restricts the choice.",
            ),
            _language_params,
            _language,
            _langid,
        ),
        _Model(
            ModelInfo(
                "yake-keywords",
                "keywords",
                ("multilingual", "unsupervised", "statistical"),
                "YAKE keyword extraction: params top (1..50, default 5) and language "
                "(default en); lower score is more relevant.",
            ),
            _keyword_params,
            _keywords,
            _yake,
        ),
        _Model(
            ModelInfo(
                "textrank-summary",
                "summarize",
                ("english", "extractive", "graph"),
                "TextRank extractive summary: param sentences (default 3); streams the chosen "
                "sentences in document order.",
                streaming=True,
            ),
            _summary_params,
            _summary,
            None,
        ),
        _Model(
            ModelInfo(
                "hash-embed",
                "embed",
                ("multilingual", "feature-hashing", "embedding"),
                "Feature-hashed word and character 3-gram frequencies, L2-normalised: a "
                "list of 256 floats (param dimensions 1..4096). Deterministic, no download.",
            ),
            _embed_params,
            _embed,
            None,
        ),
        # Aggregators for plans (models/aggregators.py): they read a candidates document.
        _Model(
            ModelInfo(
                "tfidf-judge",
                "judge",
                ("aggregator", "plan", "similarity"),
                "Judge for plan ensembles: picks the candidate most similar to the others "
                "(TF-IDF cosine medoid); answers {choice, scores}.",
                max_input_bytes=aggregators.MAX_AGGREGATOR_INPUT,
            ),
            aggregators.judge_params,
            aggregators.judge,
            None,
        ),
        _Model(
            ModelInfo(
                "textrank-synthesis",
                "synthesize",
                ("aggregator", "plan", "extractive"),
                "Synthesis for plan ensembles: the most central sentences across all "
                "candidates (TextRank); param sentences (default 3).",
                max_input_bytes=aggregators.MAX_AGGREGATOR_INPUT,
                streaming=True,
            ),
            aggregators.synthesis_params,
            aggregators.synthesize,
            None,
        ),
    )
}


class EmbeddedBackend(Backend):
    """The embedded models, or the subset named in ``models``.

    ``offload=True`` runs each model call in ``trio.to_thread.run_sync`` so the event loop
    keeps serving; ``offload=False`` runs it inline, which tests under ``autojump_clock``
    need (a thread would let virtual time jump while it works).
    """

    name = "embedded"

    def __init__(self, offload: bool = True, models: Sequence[str] | None = None) -> None:
        names = list(EMBEDDED_MODELS) if models is None else list(dict.fromkeys(models))
        unknown = [name for name in names if name not in EMBEDDED_MODELS]
        if unknown:
            raise UnknownModel(f"no embedded models {unknown}; there are: {', '.join(EMBEDDED_MODELS)}")
        self.offload = offload
        self._models = {name: EMBEDDED_MODELS[name] for name in names}

    def models(self) -> list[ModelInfo]:
        return [model.info for model in self._models.values()]

    @property
    def load_seconds(self) -> dict[str, float]:
        """How long each served model that has been loaded took to load."""
        return {
            name: model.loader.seconds
            for name, model in self._models.items()
            if model.loader is not None and model.loader.seconds is not None
        }

    async def warm(self) -> None:
        """Load every served model now, so the first request does not pay for it."""
        loaders = [model.loader for model in self._models.values() if model.loader is not None]
        for loader in loaders:
            if self.offload:
                await trio.to_thread.run_sync(loader)
            else:
                loader()

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        spec = self._models[self.info(model).name]  # info() raises UnknownModel
        text = check_text(spec.info, text)
        args = spec.check(params)
        if self.offload:
            chunks, value = await trio.to_thread.run_sync(spec.compute, text, args)
        else:
            chunks, value = spec.compute(text, args)
        for piece in chunks:
            yield Chunk(piece)
        yield Output(value)


class EchoBackend(Backend):
    """Model ``echo``: the input back word by word, then the whole input.

    The chunks (each word with the whitespace after it) join into the input exactly. With
    ``delay``, ``trio.sleep(delay)`` between chunks (virtual time under ``autojump_clock``).
    Param ``fail`` makes it fail on purpose, for failover tests:
    ``"before-first-chunk"`` raises :class:`ModelError` before yielding anything;
    ``"after-first-chunk"`` raises it after the first chunk.
    """

    name = "echo"
    FAIL_MODES = ("before-first-chunk", "after-first-chunk")

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self._info = ModelInfo("echo", "echo", ("test",), "Echoes the input word by word.", streaming=True)

    def models(self) -> list[ModelInfo]:
        return [self._info]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        info = self.info(model)
        text = check_text(info, text)
        check_param_names(params, ("fail",))
        fail = params.get("fail")
        if fail is not None and fail not in self.FAIL_MODES:
            raise InvalidInput(f"parameter 'fail' must be one of {self.FAIL_MODES}, not {fail!r}")
        if fail == "before-first-chunk":
            raise ModelError("echo failed before the first chunk, as asked")
        for index, word in enumerate(re.findall(r"\s*\S+\s*", text)):
            if index and self.delay:
                await trio.sleep(self.delay)
            yield Chunk(word)
            if fail == "after-first-chunk":
                raise ModelError("echo failed after the first chunk, as asked")
        yield Output(text)
