"""The ``foresight`` console command.

Each module in this package adds its commands through ``register(app)``, so every stage owns
its own CLI module. Errors a user can fix (bad data, bad config, missing inputs) print one line
and exit non-zero, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import typer

from flows.cli.common import EXIT_FAILED, user_error_message

PREFECT_LOGGERS = ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect._internal.concurrency",
                   "prefect.server", "prefect.events", "prefect.task_engine", "prefect.flow_engine")

app = typer.Typer(help="foresight: versioned teacher-target caches for robot learning.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress at INFO level."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")) -> None:
    """foresight: robot demonstrations -> versioned, sharded teacher-target caches -> small models."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # The CLI reports a failed flow itself, in one line; Prefect's own traceback is for --verbose.
        for name in PREFECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if quiet:
        import os

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
        message = user_error_message(exc)
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(EXIT_FAILED)
    sys.exit(code if isinstance(code, int) else 0)
