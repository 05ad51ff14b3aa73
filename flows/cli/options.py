"""CLI options derived from the stage config models, so a default is written once.

A stage command declares each of its options with :func:`config_option`, naming the config
field it sets. The option takes its help text from the field's description, its choices from
the field's ``Literal`` type, its bounds from the field's ``ge``/``le`` and the default it shows
from the field's default, and its own default is "not given" (None): the command passes only the
options the user gave (:func:`given`) to the config model, which fills in the rest (its defaults,
a preset, ``auto`` devices), exactly as it does for a ``pipeline.toml`` section. A default can
therefore not drift between the CLI and the pipeline file; ``tests/test_cli_defaults.py`` walks
every command's options against their fields.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

CONFIG_FIELD = "config_field"
"""Attribute of an option made by :func:`config_option`: the (model, field name) it sets."""
CHOICES = "config_choices"
"""Attribute of an option made by :func:`config_option`: the values it accepts (None: any)."""


def literal_choices(annotation: Any) -> list[str] | None:
    """The values of a ``Literal[...]`` (or ``Literal[...] | None``) field type; None otherwise."""
    if typing.get_origin(annotation) is Literal:
        return [str(value) for value in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            choices = literal_choices(arm)
            if choices is not None:
                return choices
    return None


def field_default(info: FieldInfo) -> Any:
    """A field's default value (its factory called); PydanticUndefined for a required field."""
    if info.default_factory is not None:
        return info.default_factory()
    return info.default


def shown_default(value: Any) -> str | bool:
    """How ``--help`` shows a default: lists comma-joined as typed, booleans as on/off, None not at all."""
    if value is None or value is PydanticUndefined or isinstance(value, (dict, BaseModel)):
        return False
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _bounds(info: FieldInfo) -> dict[str, Any]:
    """typer's min/max from the field's ge/le (so a bad number is a usage error, as before)."""
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["min"] = item.ge
        elif isinstance(item, annotated_types.Le):
            bounds["max"] = item.le
    return bounds


def config_option(model: type[BaseModel], field: str, *param_decls: str, extra_help: str = "",
                  choices: list[str] | None = None, **typer_kwargs: Any) -> Any:
    """A typer option for ``model.field``: required when the field is, else default None (not given).

    ``extra_help`` is appended to the field's description for what only the CLI needs to say
    (e.g. that a list is comma-separated); ``choices`` replaces the field's ``Literal`` values for
    an option that maps words onto a non-string field; ``typer_kwargs`` pass through. The command
    must be decorated with :func:`config_command`, which gives typer the choices.
    """
    info = model.model_fields[field]
    description = " ".join(part for part in (info.description or "", extra_help) if part)
    choices = choices if choices is not None else literal_choices(info.annotation)
    options: dict[str, Any] = {"help": description, "show_default": shown_default(field_default(info))}
    if choices is None:
        options.update(_bounds(info))
    options.update(typer_kwargs)
    option = typer.Option(... if info.is_required() else None, *param_decls, **options)
    setattr(option, CONFIG_FIELD, (model, field))
    setattr(option, CHOICES, choices)
    return option


def config_command(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give typer the choices of ``command``'s :func:`config_option` parameters, as ``Literal`` types
    of its signature (typer reads a parameter's choices from its annotation). Returns ``command``."""
    signature = inspect.signature(command, eval_str=True)
    parameters = []
    for parameter in signature.parameters.values():
        choices = getattr(parameter.default, CHOICES, None)
        if choices is not None:
            parameter = parameter.replace(annotation=Literal[tuple(choices)] | None)
        parameters.append(parameter)
    command.__signature__ = signature.replace(parameters=parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    if signature.return_annotation is not inspect.Signature.empty:
        command.__annotations__["return"] = signature.return_annotation
    return command


def given(**values: Any) -> dict[str, Any]:
    """The options the user gave (None = not given), so the config model fills in the others."""
    return {key: value for key, value in values.items() if value is not None}


def comma_list(text: str | None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']; None (not given) or only commas -> None."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return items or None


def int_list(text: str | None, option: str) -> list[int] | None:
    """'3,7,10' or '0-17,36-38' -> [ints]; '' -> []; None (not given) -> None; ValueError naming
    the option otherwise."""
    if text is None:
        return None
    values: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            low, _, high = part.partition("-")
            values.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected integers like '3,7,10' or ranges like '0-17'") from None
    return values
