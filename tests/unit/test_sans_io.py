"""identity/ and protocols/ stay sans-IO: no event loop, network, clock or randomness of their own.

Time and random values are parameters there, which is what makes the byte-exact vectors
(test_vectors_*.py) possible. The one exception is the keystore, which writes key files
and draws their salt and nonce like key generation does: it is not a wire protocol.
"""

import ast
from pathlib import Path

import pytest

import modelnet.identity
import modelnet.protocols

FORBIDDEN_MODULES = {"trio", "libp2p", "socket", "asyncio", "time", "datetime", "secrets", "random"}
RANDOMNESS_CALLS = {"urandom", "token_bytes", "token_hex", "getrandbits"}
KEY_FILES = "keystore.py"  # identity's file I/O: may use os, and os.urandom for its salt and nonce


def sources(package) -> list[Path]:
    return sorted(Path(package.__file__).parent.rglob("*.py"))


def offences(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in FORBIDDEN_MODULES or (top == "os" and path.name != KEY_FILES):
                found.append(f"{path.name}:{node.lineno} imports {name}")
        if isinstance(node, ast.Attribute) and node.attr in RANDOMNESS_CALLS and path.name != KEY_FILES:
            found.append(f"{path.name}:{node.lineno} draws randomness ({node.attr})")
    return found


@pytest.mark.parametrize("package", [modelnet.identity, modelnet.protocols], ids=["identity", "protocols"])
def test_no_io_clock_or_randomness(package):
    files = sources(package)
    assert len(files) > 5  # the walk found the package
    assert [offence for path in files for offence in offences(path)] == []


def test_the_check_catches_what_it_forbids(tmp_path):
    module = tmp_path / "machine.py"
    module.write_text("import os\nfrom time import time\nimport trio.lowlevel\nnonce = os.urandom(16)\n")
    assert offences(module) == [
        "machine.py:1 imports os",
        "machine.py:2 imports time",
        "machine.py:3 imports trio.lowlevel",
        "machine.py:4 draws randomness (urandom)",
    ]
