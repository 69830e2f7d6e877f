"""Model backends: answers, input checks, the streaming contract, offload, echo, registry."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.errors import ModelNetError
from modelnet.models import (
    Chunk,
    EchoBackend,
    EmbeddedBackend,
    InvalidInput,
    ModelError,
    Output,
    UnknownModel,
    load_backends,
)
from modelnet.models import summarize
from modelnet.models.base import ModelInfo, check_text

MODELS = ("vader-sentiment", "langid", "yake-keywords", "textrank-summary", "hash-embed", "tfidf-judge", "textrank-synthesis")

# The hub sentence (shares words with both other solar sentences) comes last, so a summary
# in score order would differ from one in document order.
SOLAR = (
    "Modern solar panels convert more sunlight into electricity than older panels. "
    "My cat likes to sleep on the sofa. "
    "Homes with solar panels sell electricity back to the grid. "
    "The bakery opens at seven. "
    "Solar panels convert sunlight into electricity for homes. "
    "Tomorrow it might rain in the mountains."
)
SOLAR_SUMMARY = [
    "Modern solar panels convert more sunlight into electricity than older panels.",
    "Homes with solar panels sell electricity back to the grid.",
    "Solar panels convert sunlight into electricity for homes.",
]
KADEMLIA = (
    "Kademlia is a distributed hash table for decentralized peer-to-peer computer networks. "
    "It specifies the structure of the network and the exchange of information through node "
    "lookups. Kademlia nodes communicate among themselves using UDP. A virtual or overlay "
    "network is formed by the participant nodes. Each node is identified by a number or node "
    "ID. The node ID serves not only as identification, but the Kademlia algorithm uses the "
    "node ID to locate values."
)


@pytest.fixture
def inline() -> EmbeddedBackend:
    return EmbeddedBackend(offload=False)


async def collect(backend, model, text, params=None) -> list[Chunk | Output]:
    items = []
    async with contextlib.aclosing(backend.run(model, text, {} if params is None else params)) as stream:
        async for item in stream:
            items.append(item)
    return items


def check_contract(items) -> tuple[list[str], object]:
    """Chunks, then exactly one msgpack-able Output, last; returns (chunk texts, value)."""
    assert items and isinstance(items[-1], Output)
    assert all(isinstance(item, Chunk) and isinstance(item.text, str) for item in items[:-1])
    value = items[-1].value
    assert msgpack.unpackb(msgpack.packb(value), strict_map_key=True) == value
    return [item.text for item in items[:-1]], value


async def answer(backend, model, text, params=None):
    chunks, value = check_contract(await collect(backend, model, text, params))
    if not backend.info(model).streaming:
        assert chunks == []
    return value


async def raises_before_output(backend, model, text, params, error=InvalidInput) -> None:
    stream = backend.run(model, text, params)
    with pytest.raises(error):
        await stream.__anext__()  # the very first item is the error
    await stream.aclose()


# --- answers on clear inputs ---


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("I absolutely love this wonderful book, it is great!", "positive"),
        ("This is a terrible, horrible experience and I hate it.", "negative"),
        ("The train leaves at nine.", "neutral"),
    ],
)
async def test_sentiment(inline, text, label):
    value = await answer(inline, "vader-sentiment", text)
    assert value["label"] == label
    assert set(value) == {"label", "compound", "pos", "neu", "neg"}
    assert -1.0 <= value["compound"] <= 1.0
    assert math.isclose(value["pos"] + value["neu"] + value["neg"], 1.0, abs_tol=0.01)
    if label == "neutral":
        assert abs(value["compound"]) < 0.05
    else:
        assert (value["compound"] >= 0.05) == (label == "positive")


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Le chat dort sur le canapé pendant que nous préparons le dîner.", "fr"),
        ("Der Hund spielt jeden Morgen im Garten mit den Kindern.", "de"),
        ("The weather today is sunny and we are going to the beach.", "en"),
    ],
)
async def test_language(inline, text, language):
    value = await answer(inline, "langid", text)
    assert value["language"] == language
    assert 0.9 < value["confidence"] <= 1.0


@pytest.mark.parametrize("candidates", ["en, fr", ["en", "fr"]])
async def test_language_candidates_restrict_the_answer(inline, candidates):
    text = "Der Hund spielt jeden Morgen im Garten mit den Kindern."
    value = await answer(inline, "langid", text, {"candidates": candidates})
    assert value["language"] in {"en", "fr"}
    assert 0.0 <= value["confidence"] <= 1.0
    # One candidate is certain; the shared model was not narrowed for later calls.
    assert await answer(inline, "langid", text, {"candidates": "fr"}) == {"language": "fr", "confidence": 1.0}
    assert (await answer(inline, "langid", text))["language"] == "de"


async def test_keywords(inline):
    value = await answer(inline, "yake-keywords", KADEMLIA, {"top": 10})
    keywords = value["keywords"]
    assert 1 <= len(keywords) <= 10
    assert "kademlia" in [entry["keyword"].lower() for entry in keywords]
    scores = [entry["score"] for entry in keywords]
    assert scores == sorted(scores)  # lower is more relevant, best first
    assert len((await answer(inline, "yake-keywords", KADEMLIA))["keywords"]) == 5
    assert len((await answer(inline, "yake-keywords", KADEMLIA, {"top": 2}))["keywords"]) == 2


async def test_keywords_german(inline):
    text = (
        "Die Photosynthese ist ein Prozess, bei dem Pflanzen Licht in Energie umwandeln. "
        "Die Photosynthese findet in den Chloroplasten statt."
    )
    value = await answer(inline, "yake-keywords", text, {"language": "de", "top": 10})
    words = [entry["keyword"] for entry in value["keywords"]]
    assert "Photosynthese" in words
    assert not any(word.lower() in {"die", "ist", "in"} for word in words)  # German stopwords


async def test_summary_streams_the_central_sentences_in_order(inline):
    items = await collect(inline, "textrank-summary", SOLAR)
    chunks, value = check_contract(items)
    assert [chunk.strip() for chunk in chunks] == SOLAR_SUMMARY
    assert "".join(chunks) == value == " ".join(SOLAR_SUMMARY)


async def test_summary_sentences_param(inline):
    assert await answer(inline, "textrank-summary", SOLAR, {"sentences": 1}) == SOLAR_SUMMARY[2]
    everything = await answer(inline, "textrank-summary", SOLAR, {"sentences": 50})
    assert everything == SOLAR


# --- the summariser's parts ---


def test_split_sentences():
    text = 'Dr. Smith met J. Doe at 5 p.m. today. "Really?" she asked.\n\nNew paragraph\n\nEnd'
    assert summarize.split_sentences(text) == [
        "Dr. Smith met J. Doe at 5 p.m. today.",
        '"Really?"',
        "she asked.",
        "New paragraph",
        "End",
    ]


def test_content_words_drop_stopwords_and_fold_plurals():
    assert summarize.content_words("The panels and the panel's glass") == {"panel", "glass"}


def test_pagerank_ranks_the_hub_first():
    # A star: vertex 0 linked to 1, 2, 3; vertex 4 isolated.
    edges = [{1: 1.0, 2: 1.0, 3: 1.0}, {0: 1.0}, {0: 1.0}, {0: 1.0}, {}]
    scores = summarize.pagerank(edges)
    assert math.isclose(sum(scores), 1.0)
    assert scores[0] > scores[1] == scores[2] == scores[3] > scores[4]
    assert summarize.pagerank([]) == []


def test_summary_without_shared_words_is_the_lead():
    text = "Apples grow. Bicycles rust. Clouds drift. Dolphins swim."
    assert summarize.summarize(text, 2) == ["Apples grow.", "Bicycles rust."]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300), st.integers(1, 5))
def test_summarize_any_text(text, count):
    sentences = summarize.split_sentences(text)
    assert all(sentence and sentence == sentence.strip() for sentence in sentences)
    assert bool(sentences) == bool(text.strip())
    chosen = summarize.summarize(text, count)
    assert len(chosen) == min(count, len(sentences))
    positions = [sentences.index(sentence) for sentence in chosen]
    assert positions == sorted(positions)


# --- invalid input: typed errors before any output ---


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("text", ["", "  \n\t ", b"bytes", None])
async def test_empty_or_non_text_input(inline, model, text):
    await raises_before_output(inline, model, text, {})


@pytest.mark.parametrize("model", MODELS)
async def test_input_over_the_byte_limit(inline, model):
    limit = inline.info(model).max_input_bytes
    await raises_before_output(inline, model, "é" * (limit // 2 + 1), {})  # 2 bytes each
    assert check_text(inline.info(model), "a" * limit)


@pytest.mark.parametrize(
    ("model", "params"),
    [
        ("vader-sentiment", {"top": 3}),
        ("vader-sentiment", ["not", "a", "mapping"]),
        ("langid", {"candidates": ""}),
        ("langid", {"candidates": " , "}),
        ("langid", {"candidates": 7}),
        ("langid", {"candidates": ["en", 3]}),
        ("langid", {"candidates": "en,xx"}),
        ("yake-keywords", {"top": 0}),
        ("yake-keywords", {"top": 51}),
        ("yake-keywords", {"top": "5"}),
        ("yake-keywords", {"top": True}),
        ("yake-keywords", {"language": "klingon"}),
        ("yake-keywords", {"language": 5}),
        ("textrank-summary", {"sentences": 0}),
        ("textrank-summary", {"sentences": 2.5}),
        ("textrank-summary", {"sentence": 2}),
        ("hash-embed", {"dimensions": 0}),
        ("hash-embed", {"dimensions": 4097}),
        ("hash-embed", {"top": 3}),
    ],
)
async def test_bad_params(inline, model, params):
    await raises_before_output(inline, model, "Some perfectly fine input text.", params)


async def test_unknown_model(inline):
    await raises_before_output(inline, "gpt-5", "hello", {}, UnknownModel)
    await raises_before_output(EchoBackend(), "langid", "hello", {}, UnknownModel)


async def test_subset_of_models():
    backend = EmbeddedBackend(offload=False, models=["langid"])
    assert [info.name for info in backend.models()] == ["langid"]
    await raises_before_output(backend, "vader-sentiment", "I love it", {}, UnknownModel)
    assert (await answer(backend, "langid", "The weather today is sunny."))["language"] == "en"
    with pytest.raises(UnknownModel, match="nope"):
        EmbeddedBackend(models=["langid", "nope"])


def test_model_infos():
    infos = {info.name: info for info in EmbeddedBackend().models()}
    assert list(infos) == list(MODELS)
    assert [infos[name].task for name in MODELS] == ["sentiment", "language-id", "keywords", "summarize", "embed", "judge", "synthesize"]
    assert [name for name in MODELS if infos[name].streaming] == ["textrank-summary", "textrank-synthesis"]
    assert all(isinstance(info, ModelInfo) and info.description and info.tags for info in infos.values())


@settings(max_examples=50, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    text=st.text(max_size=200),
    params=st.dictionaries(
        st.sampled_from(["top", "language", "candidates", "sentences", "dimensions", "other"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(-3, 60), st.text(max_size=8), st.lists(st.text(max_size=3))
        ),
        max_size=2,
    ),
)
async def test_any_input_gives_an_answer_or_a_typed_error(model, text, params):
    backend = EmbeddedBackend(offload=False)
    try:
        await answer(backend, model, text, params)
    except ModelNetError as exc:
        assert isinstance(exc, ModelError)


# --- offload ---


async def test_offload_runs_models_in_a_thread_and_inline_does_not(monkeypatch):
    offloaded = []
    original = trio.to_thread.run_sync

    async def spy(fn, *args, **kwargs):
        offloaded.append(fn.__name__)
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    threaded, inline = EmbeddedBackend(offload=True), EmbeddedBackend(offload=False)
    cases = [("vader-sentiment", "I love it"), ("langid", "Bonjour tout le monde, comment allez-vous ?")]
    for model, text in cases:
        assert await collect(threaded, model, text) == await collect(inline, model, text)
    summary = await collect(threaded, "textrank-summary", SOLAR)
    assert summary == await collect(inline, "textrank-summary", SOLAR)
    assert len(offloaded) == 3  # only the offloading backend's calls


async def test_offload_serves_concurrent_calls():
    backend = EmbeddedBackend(offload=True)
    texts = {
        "fr": "Le chat dort sur le canapé pendant que nous préparons le dîner.",
        "de": "Der Hund spielt jeden Morgen im Garten mit den Kindern.",
        "en": "The weather today is sunny and we are going to the beach.",
    }
    found = {}

    async def identify(language, text, candidates):
        value = await answer(backend, "langid", text, {"candidates": candidates})
        found[language, candidates] = value["language"]

    async with trio.open_nursery() as nursery:
        for language, text in texts.items():
            for candidates in ("en,fr,de", "en,fr,de,es,it"):
                nursery.start_soon(identify, language, text, candidates)
    assert found == {(language, c): language for language in texts for c in ("en,fr,de", "en,fr,de,es,it")}


async def test_load_times_are_reported(inline):
    await answer(inline, "langid", "Hello there, how are you today?")
    assert inline.load_seconds["langid"] >= 0.0
    assert "textrank-summary" not in inline.load_seconds  # nothing to load


# --- echo ---


async def test_echo_streams_words_then_the_input():
    text = "  hello   peer-to-peer\nworld "
    chunks, value = check_contract(await collect(EchoBackend(), "echo", text))
    assert chunks == ["  hello   ", "peer-to-peer\n", "world "]
    assert "".join(chunks) == value == text


async def test_echo_delay_uses_trio_time(autojump_clock):
    start = trio.current_time()
    items = await collect(EchoBackend(delay=0.5), "echo", "one two three four")
    assert len(items) == 5
    assert trio.current_time() - start == pytest.approx(1.5)  # between chunks only


async def test_echo_failures_on_purpose():
    echo = EchoBackend()
    await raises_before_output(echo, "echo", "one two", {"fail": "before-first-chunk"}, ModelError)
    stream = echo.run("echo", "one two", {"fail": "after-first-chunk"})
    assert await stream.__anext__() == Chunk("one ")
    with pytest.raises(ModelError):
        await stream.__anext__()
    await raises_before_output(echo, "echo", "one two", {"fail": "sometimes"})
    await raises_before_output(echo, "echo", "one two", {"delay": 1})
    await raises_before_output(echo, "echo", "", {})


# --- registry ---


def test_load_backends():
    backends = load_backends(["embedded:langid", "echo"], offload=False)
    assert [[info.name for info in backend.models()] for backend in backends] == [["langid"], ["echo"]]
    assert backends[0].offload is False
    (everything,) = load_backends(["embedded"])
    assert [info.name for info in everything.models()] == list(MODELS)
    assert everything.offload is True
    (slow,) = load_backends(["echo:0.25"])
    assert slow.delay == 0.25
    assert load_backends([]) == []


@pytest.mark.parametrize(
    "specs",
    [
        ["openai"],
        ["embedded:nope"],
        ["embedded:"],
        ["echo:soon"],
        ["echo:-1"],
        ["echo:nan"],
        ["embedded", "embedded:langid"],
    ],
)
def test_load_backends_rejects(specs):
    with pytest.raises(ModelError) as raised:
        load_backends(specs)
    if "embedded" not in specs:
        assert "embedded:textrank-summary" in str(raised.value)  # names the valid specs


def test_warm_loads_every_served_model_before_the_first_request():
    # A fresh interpreter: in this one, other tests have loaded the models already.
    script = (
        "import trio\n"
        "from modelnet.models.embedded import EmbeddedBackend\n"
        "b = EmbeddedBackend(offload=False, models=['langid', 'vader-sentiment'])\n"
        "assert b.load_seconds == {}, b.load_seconds\n"
        "trio.run(b.warm)\n"
        "print(sorted(b.load_seconds))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['langid', 'vader-sentiment']"
