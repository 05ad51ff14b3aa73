"""Typed references between stored things: what a recipe input or a lineage event names.

A reference is a kind and an id. Its kind is never stored beside the id (recipes were hashed with
bare ids, and every version id must keep holding): it comes from the recipe input's key ('plan')
or from the id's prefix, which every content-addressed id carries (``<kind>-<12 hex>``, see
docs/ARCHITECTURE.md, Version rules). :func:`Ref.infer` is the one id test of the code base.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, PlainSerializer

from foresight.schemas.base import StrictModel

TargetKind = Literal["video", "teacher", "text", "pi0"]
RefKind = Literal["dataset", "plan", "version", "export", "run", "eval", "source", "value"]
"""'version' is a target version; 'source' a path or URL outside the root (what ingest read);
'value' an input that names nothing stored (a dataset fingerprint)."""

VERSION_ID = re.compile(rf"^({'|'.join(get_args(TargetKind))})-[0-9a-f]{{12}}$")
"""A target version id: '<target kind>-<12 hex>' (schemas.target.content_id)."""
_PREFIXED_ID = {"plan": re.compile(r"^plan-[0-9a-f]{12}$"), "export": re.compile(r"^export-[0-9a-f]{12}$")}
PLAN_KEY = "plan"
"""The recipe input key that names a plan (whatever the plan id looks like)."""


class Ref(StrictModel):
    """One referenced thing: its kind and its id (a dataset name, a plan/version/export/run/eval id)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: RefKind
    id: str

    @classmethod
    def infer(cls, value: str) -> Ref:
        """The reference an id makes on its own: version, plan or export by its prefix, else a value."""
        if VERSION_ID.match(value):
            return cls(kind="version", id=value)
        for kind, pattern in _PREFIXED_ID.items():
            if pattern.match(value):
                return cls(kind=kind, id=value)
        return cls(kind="value", id=value)

    @classmethod
    def recipe_input(cls, key: str, value: str) -> Ref:
        """A recipe input: the 'plan' key names a plan, any other key is typed by its id."""
        return cls(kind="plan", id=value) if key == PLAN_KEY else cls.infer(value)

    @property
    def target_kind(self) -> str | None:
        """'video', 'teacher', ... of a version reference (its id's prefix); None for other kinds."""
        return self.id.split("-", 1)[0] if self.kind == "version" else None

    def __str__(self) -> str:
        return self.id


def is_version_id(value: Any) -> bool:
    """True for a string that is a target version id."""
    return isinstance(value, str) and Ref.infer(value).kind == "version"


def plan(plan_id: str) -> Ref:
    return Ref(kind="plan", id=plan_id)


def version(version_id: str) -> Ref:
    return Ref(kind="version", id=version_id)


def export(export_id: str) -> Ref:
    return Ref(kind="export", id=export_id)


def run(run_id: str) -> Ref:
    return Ref(kind="run", id=run_id)


def dataset(name: str) -> Ref:
    return Ref(kind="dataset", id=name)


def evaluation(eval_id: str) -> Ref:
    return Ref(kind="eval", id=eval_id)


def source(location: str) -> Ref:
    return Ref(kind="source", id=str(location))


def _typed_inputs(value: Any) -> Any:
    """Recipe inputs as stored (input key -> bare id) become typed references; refs pass through."""
    if not isinstance(value, dict):
        return value
    return {key: item if isinstance(item, Ref) else Ref.recipe_input(key, item) if isinstance(item, str) else item
            for key, item in value.items()}


def _input_ids(value: dict[str, Ref]) -> dict[str, str]:
    return {key: ref.id for key, ref in value.items()}


RecipeInputs = Annotated[dict[str, Ref], BeforeValidator(_typed_inputs), PlainSerializer(_input_ids)]
"""Recipe inputs: typed in memory, stored and hashed as ``{key: id}`` (the bytes every version id was made of)."""
