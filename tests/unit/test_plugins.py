"""Plug-in backends: a real distribution on sys.path, found through its entry points."""

from __future__ import annotations

import contextlib
import sys
import textwrap

import pytest

from modelnet.models.base import ModelError
from modelnet.models.plugins import ENTRY_POINT_GROUP, PluginError, plugin_names
from modelnet.models.registry import load_backends, valid_specs

PLUGIN = '''
from modelnet.models.base import Backend, ModelError, ModelInfo, Output, check_text

class Shout(Backend):
    name = "shout"

    def __init__(self, suffix, offload):
        if suffix == "bad":
            raise ModelError("suffix 'bad' is not allowed")
        self.suffix = suffix or "!"
        self.offload = offload

    def models(self):
        return [ModelInfo("shout", "shouting", ("acme",), context_length=512)]

    async def run(self, model, text, params):
        info = self.info(model)
        yield Output(check_text(info, text).upper() + self.suffix)

def make(argument, offload):
    return Shout(argument, offload)

def crash(argument, offload):
    raise RuntimeError("the licence server is down")

def not_a_backend(argument, offload):
    return "a string"
'''

ENTRY_POINTS = {
    "acme-shout": "acme_shout_plugin:make",
    "acme-crash": "acme_shout_plugin:crash",
    "acme-string": "acme_shout_plugin:not_a_backend",
    "acme-missing": "acme_no_such_module:make",
    "acme-typo": "acme_shout_plugin:maek",
    "echo": "acme_shout_plugin:make",  # a built-in name: the built-in wins
}


@pytest.fixture
def distribution(tmp_path, monkeypatch):
    """Install ``acme-models 1.2`` by writing its files onto sys.path, as pip would."""
    (tmp_path / "acme_shout_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "acme_models-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.2\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {value}" for name, value in ENTRY_POINTS.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates importlib's caches
    yield tmp_path
    sys.modules.pop("acme_shout_plugin", None)


async def test_a_plugin_backend_loads_and_runs(distribution):
    assert {"acme-shout", "acme-crash"} <= set(plugin_names())
    assert "acme-shout[:<argument>] (plug-in)" in valid_specs()
    (plain,) = load_backends(["acme-shout"], offload=False)
    assert plain.suffix == "!" and plain.offload is False
    assert plain.models()[0].context_length == 512
    async with contextlib.aclosing(plain.run("shout", "hello", {})) as items:
        assert [item.value async for item in items] == ["HELLO!"]
    (suffixed,) = load_backends(["acme-shout:?!"])
    assert suffixed.suffix == "?!"


def test_builtin_names_win(distribution):
    (echo,) = load_backends(["echo"])
    assert type(echo).__name__ == "EchoBackend"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acme-crash", r"plug-in backend 'acme-crash' \(acme_shout_plugin:crash from acme-models 1.2\) failed: RuntimeError: the licence server is down"),
        ("acme-string", r"'acme-string' .* returned str, not a modelnet Backend"),
        ("acme-missing", r"'acme-missing' .*acme-models 1.2\) cannot be loaded: ModuleNotFoundError"),
        ("acme-typo", r"'acme-typo' .* cannot be loaded: AttributeError"),
        ("acme-shout:bad", r"'acme-shout' .*: suffix 'bad' is not allowed"),
    ],
)
def test_a_broken_plugin_is_named(distribution, spec, message):
    with pytest.raises(PluginError, match=message):
        load_backends([spec])


def test_unknown_kind_lists_the_plugins(distribution):
    with pytest.raises(ModelError, match=r"unknown backend 'acme-nothing'.*acme-shout\[:<argument>\] \(plug-in\)"):
        load_backends(["acme-nothing"])


def test_a_name_registered_twice_is_refused(distribution, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("other")
    info = other / "other_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: other-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacme-shout = other_module:make\n")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(PluginError, match="registered more than once"):
        load_backends(["acme-shout"])


def test_without_the_distribution_there_is_no_plugin():
    assert "acme-shout" not in plugin_names()
    with pytest.raises(ModelError, match="unknown backend"):
        load_backends(["acme-shout"])
