"""Shared CLI pieces: the data-root option, sub-apps, and turning exceptions into one line."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError

from foresight.schemas.base import describe_validation_error
from foresight.storage.fs import DiskFullError, Root, default_root, free_bytes, open_root

T = TypeVar("T")

EXIT_FAILED = 1
"""The command failed: nothing (more) was written."""
EXIT_USAGE = 2
"""The command was used on something it cannot take (e.g. not a dataset folder): nothing was written."""
EXIT_PARTIAL = 3
"""The run finished but some inputs were quarantined; see the dataset's quarantine.jsonl."""

ROOT_OPTION = typer.Option(None, "--root", envvar="FORESIGHT_ROOT",
                           help="Data root (any fsspec URL). Default ./foresight-data.")

_SUBAPPS: dict[str, typer.Typer] = {}


def sub_app(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """The sub-app ``name`` of ``app`` (created once), so several modules can add commands to it."""
    if name not in _SUBAPPS:
        _SUBAPPS[name] = typer.Typer(help=help, no_args_is_help=True)
        app.add_typer(_SUBAPPS[name], name=name)
    return _SUBAPPS[name]


def get_root(root: str | None, writable: bool = False) -> Root:
    """The data root of a command; with ``writable``, fail early when it cannot be written."""
    resolved = open_root(root or default_root())
    if writable:
        resolved.check_writable()
    return resolved


def user_error_message(exc: BaseException) -> str | None:
    """A one-line message for errors a user can fix; None for bugs (which keep their traceback)."""
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc, "config")
    if callable(getattr(exc, "format_message", None)):
        # click's (or typer's vendored click's) usage errors: bad option, unknown command.
        return exc.format_message()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
        path = str(exc.filename or "")
        where = f"under {path}" if os.path.isdir(path) else path or "a file (the writer did not name it)"
        free = free_bytes(os.path.join(path, ".") if os.path.isdir(path) else path) if path else None
        return f"disk full writing {where}" + (f" ({free} bytes free)" if free is not None else "")
    if isinstance(exc, (ValueError, FileNotFoundError, PermissionError, KeyError, OSError)):
        return " ".join(_original_message(str(exc)).split()) or exc.__class__.__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        return user_error_message(cause)
    return None


def _original_message(text: str) -> str:
    """The error line of an exception re-raised from a DataLoader worker (whose message carries
    the worker's whole traceback), else ``text``."""
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def usage_value(parse: Callable[..., T], *args: Any) -> T:
    """``parse(*args)`` for a command's option value or source argument, before anything is written:
    its ValueError is a usage error (one line, exit 2)."""
    try:
        return parse(*args)
    except ValueError as err:
        fail(str(err), EXIT_USAGE)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one line to stderr and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
