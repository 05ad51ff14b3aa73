"""The ``foresight`` console command.

Each module in this package adds its commands through ``register(app)``, so every stage owns
its own CLI module. Every error prints one line (``error: ...``) and exits non-zero: errors a user
can fix (bad data, bad config, missing inputs) as they are, anything else with its type; the
traceback goes to the flow run's log (``<root>/logs/<flow-run>.log``) or, outside a flow, to a
log file in the temp folder, whose path the line names. ``--debug`` prints the traceback too.
Exit codes follow click: 2 for a usage error (unknown option, bad choice, missing argument),
1 for a failed command (see ``flows.cli.common`` for the others).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from importlib import metadata

import typer
from pydantic import ValidationError

from foresight import DISTRIBUTION
from foresight.flows.cli.common import EXIT_FAILED, EXIT_USAGE, user_error_message
from foresight.flows.runtime import DEBUG_ENV, debug_enabled
from foresight.storage.targets import NO_VERIFY_ENV

PREFECT_LOGGERS = ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect._internal.concurrency",
                   "prefect.server", "prefect.events", "prefect.task_engine", "prefect.flow_engine")


app = typer.Typer(help="foresight: versioned teacher-target caches for robot learning.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def installed_version() -> str:
    """The version of the installed distribution (``pip install -e .`` included)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ValueError(f"distribution {DISTRIBUTION!r} is not installed: run `pip install -e .` in the "
                         "checkout to get a version") from None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"foresight {installed_version()}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       expose_value=False, help="Print the installed version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress at INFO level."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
          debug: bool = typer.Option(False, "--debug", help="Print tracebacks and Prefect's/Dask's logs."),
          no_verify: bool = typer.Option(False, "--no-verify",
                                         help="Read target versions and exports without checking their "
                                              "checksums (faster; recorded in what is written).")) -> None:
    """foresight: robot demonstrations -> versioned, sharded teacher-target caches -> small models."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if debug:
        os.environ[DEBUG_ENV] = "1"
    elif not verbose:
        # The CLI reports a failed flow itself, in one line; the details go to the run's log file.
        for name in PREFECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if no_verify:
        os.environ[NO_VERIFY_ENV] = "1"
        logging.getLogger("foresight").warning("--no-verify: checksums of target versions and exports are not "
                                               "checked while reading")
    if quiet:
        os.environ["FORESIGHT_QUIET"] = "1"


def _register_all() -> None:
    package = sys.modules[__name__]
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module == "common" or module.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{module}")
        if hasattr(mod, "register"):
            mod.register(app)


_register_all()


def main() -> None:
    """Console entry point: run the app; user errors become one line on stderr."""
    try:
        # Without standalone mode click returns the exit code of `raise typer.Exit(code)`.
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the boundary where errors become messages
        typer.echo(f"error: {error_line(exc)}", err=True)
        sys.exit(exit_code(exc))
    sys.exit(code if isinstance(code, int) else 0)


def exit_code(exc: BaseException) -> int:
    """2 for usage errors, else 1. Usage errors: click's (its own convention, ``UsageError.exit_code``;
    typer ships its own copy of click, so they are recognised by their click attributes rather than
    by class), and a command's options that its config model refuses (a pydantic ValidationError
    raised while the command builds its config: a value outside an option's choices or range).
    Stored records and config files are validated into ValueErrors naming the file: exit 1.
    """
    if callable(getattr(exc, "format_message", None)) and getattr(exc, "exit_code", None) == EXIT_USAGE:
        return EXIT_USAGE
    if isinstance(exc, ValidationError):
        return EXIT_USAGE
    return EXIT_FAILED


def error_line(exc: BaseException) -> str:
    """The one line printed for a failed command; with ``--debug`` the traceback is printed first.

    A bug (no user-facing message) is named by its type, and its traceback is kept in the flow
    run's log, or in a log file written here when it happened outside a flow.
    """
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    message = user_error_message(exc)
    log_path = getattr(exc, "log_path", None)
    if message is None:
        message = f"{exc.__class__.__name__}: {' '.join(str(exc).split())}".rstrip(": ")
        if log_path is None and not debug_enabled():
            log_path = _write_traceback(exc)
    return f"{message} (details: {log_path})" if log_path else message


def _write_traceback(exc: BaseException) -> str | None:
    """Save a traceback to ``<tmp>/foresight-logs/cli-<time>-<pid>.log``; its path (None if unwritable)."""
    folder = os.path.join(tempfile.gettempdir(), "foresight-logs")
    path = os.path.join(folder, f"cli-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as handle:
            traceback.print_exception(exc, file=handle)
    except OSError:
        return None
    return path
