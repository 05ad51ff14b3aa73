"""Shared base model, format version and canonical JSON used by every record."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT_VERSION = 1
"""On-disk format version of every store. Bumped when a reader could misread older files."""


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys, so a typo in a config is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


def check_format_version(found: Any, where: str) -> None:
    """Raise a clear ValueError when a stored file was written by another format version."""
    if found != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {found!r} is not supported by this foresight "
            f"(expects {FORMAT_VERSION}); re-create the store or use a matching foresight release"
        )


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte string that version ids hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"value of type {type(value).__name__} cannot be written as JSON")


def describe_validation_error(err: ValidationError, where: str) -> str:
    """Every problem of a pydantic ValidationError on one line, naming each key."""
    problems = []
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{loc}'")
        elif item["type"] == "missing":
            problems.append(f"missing key '{loc}'")
        else:
            problems.append(f"'{loc}': {item['msg']}")
    return f"{where}: " + "; ".join(problems)


def validate(model: type[BaseModel], data: Any, where: str) -> Any:
    """Validate ``data`` as ``model``; on failure raise one ValueError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ValueError(describe_validation_error(err, where)) from None


def validate_stored(model: type[BaseModel], data: Any, where: str) -> Any:
    """Validate a stored JSON record (manifest, index, dataset.json, ...) read from ``where``.

    One ValueError naming ``where`` when it is not a JSON object, was written by another format
    version, or does not match ``model``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(data).__name__}")
    check_format_version(data.get("format_version"), where)
    return validate(model, data, where)
