"""Plan files for ``modelnet ask --plan``: YAML (``.yaml``, ``.yml``) or JSON (``.json``).

The file holds a plan's dict form (:mod:`modelnet.protocols.plan`). YAML is read with
``safe_load`` (no Python objects); the file is size-capped, and aliases cannot blow a plan
up past its step cap because the plan reader counts steps as it goes.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelnet.errors import ModelNetError
from modelnet.protocols import plan as plans

MAX_FILE_BYTES = 256 << 10


class PlanFileError(ModelNetError):
    """A plan file that cannot be read or is not a valid plan; the message names the file."""


def load_plan_file(path: str | Path) -> plans.PlanNode:
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PlanFileError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PlanFileError(f"plan file {path} is over {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PlanFileError(f"plan file {path} is not UTF-8 text") from None
    return parse_plan_text(text, path.name)


def parse_plan_text(text: str, name: str = "plan") -> plans.PlanNode:
    """A plan from YAML or JSON text (JSON is YAML too; ``.json`` names are read strictly)."""
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlanFileError(f"{name}: not valid JSON: {exc}") from None
    else:
        import yaml  # only plan files need it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanFileError(f"{name}: not valid YAML: {' '.join(str(exc).split())}") from None
    try:
        return plans.from_dict(data)
    except plans.InvalidPlan as exc:
        raise PlanFileError(f"{name}: {exc}") from None
