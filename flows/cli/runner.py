"""The task-runner options every flow command shares: ``--workers``, ``--dask-local N``,
``--dask-address tcp://HOST:PORT``.

A command opts in with the :func:`runner_options` decorator and receives a ``runner:
RunnerChoice`` argument::

    @app.command()
    @runner_options
    def generate(plan: str = typer.Option(...), runner: RunnerChoice = None) -> None:
        run_flow(generate_flow, runner, root, ...)

The decorator adds the three options to the command's signature (so ``--help`` lists them)
and turns them into one validated :class:`RunnerChoice`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import typer

from foresight.flows.runtime import DASK_ADDRESS_ENV, RunnerChoice

RUNNER_PARAMETER = "runner"

WORKERS_OPTION = typer.Option(1, "--workers", min=1, help="Local worker threads (without Dask).")
DASK_LOCAL_OPTION = typer.Option(
    None, "--dask-local", min=1, metavar="N",
    help="Run tasks on a Dask cluster of N worker processes started on this machine (one per GPU).")
DASK_ADDRESS_OPTION = typer.Option(
    None, "--dask-address", envvar=DASK_ADDRESS_ENV, metavar="tcp://HOST:PORT",
    help="Run tasks on an existing Dask scheduler (GPU workers: `dask worker ADDR --resources GPU=1`).")

FLAGS = {"--workers", "--dask-local", "--dask-address"}
_OPTIONS = (
    ("runner_workers", int, WORKERS_OPTION),
    ("runner_dask_local", int | None, DASK_LOCAL_OPTION),
    ("runner_dask_address", str | None, DASK_ADDRESS_OPTION),
)


def runner_choice(workers: int = 1, dask_local: int | None = None, dask_address: str | None = None) -> RunnerChoice:
    """A validated RunnerChoice from CLI values; ValueError with a one-line reason otherwise."""
    if dask_local is not None and dask_address is not None:
        raise ValueError("--dask-local and --dask-address exclude each other: pick one")
    return RunnerChoice(workers=workers, dask_local=dask_local, dask_address=dask_address)


def runner_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a typer command that has a ``runner`` parameter with the shared runner options."""
    signature = inspect.signature(command, eval_str=True)  # resolved in the command's own module
    if RUNNER_PARAMETER not in signature.parameters:
        raise TypeError(f"{command.__name__}: @runner_options needs a '{RUNNER_PARAMETER}' parameter")
    for name, parameter in signature.parameters.items():
        flags = set(getattr(parameter.default, "param_decls", None) or ()) | {f"--{name.replace('_', '-')}"}
        clash = flags & FLAGS
        if clash:
            raise TypeError(f"{command.__name__}: parameter '{name}' declares {sorted(clash)}, which "
                            "@runner_options adds; remove it and read the runner argument instead")

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs[RUNNER_PARAMETER] = runner_choice(kwargs.pop("runner_workers"), kwargs.pop("runner_dask_local"),
                                                 kwargs.pop("runner_dask_address"))
        return command(*args, **kwargs)

    kept = [p for name, p in signature.parameters.items() if name != RUNNER_PARAMETER]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
             for name, annotation, option in _OPTIONS]
    wrapper.__signature__ = signature.replace(parameters=_ordered(kept + added))
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__  # typer must read the new signature, not follow back to the original
    return wrapper


def _ordered(parameters: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Positional parameters first, then keyword-only ones (inspect requires that order)."""
    positional = [p for p in parameters if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY]
    return positional + keyword
