"""Where flows run: Prefect's embedded API by default, a local or remote Dask cluster on request.

Every flow is started through :func:`run_flow`, which owns the Prefect environment (never the
user's home) and the task runner; flows themselves never know where they run. On Dask, tasks
whose parameters ask for a CUDA device run only on workers that declare a ``GPU`` resource, one
at a time per GPU (:mod:`flows.dask_runner`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import Field, model_validator

from foresight.schemas.base import StrictModel
from foresight.storage import layout
from foresight.storage.fs import Root, open_root

log = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
DASK_ADDRESS_ENV = "FORESIGHT_DASK_ADDRESS"
DEBUG_ENV = "FORESIGHT_DEBUG"
"""Set by ``foresight --debug``: Prefect's and Dask's logs and tracebacks reach the terminal too."""
LOGS_DIR = layout.LOGS
"""Folder under the data root holding one ``<flow-run>.log`` per flow run that logged anything."""
ENGINE_LOGGERS = ("prefect", "distributed", "dask")
"""Loggers whose records (Prefect's and Dask's engine chatter and tracebacks) go to the run's log only."""


class RunnerChoice(StrictModel):
    """How a flow's tasks are executed."""

    workers: int = Field(default=1, ge=1, description="Local workers (threads or processes).")
    processes: bool = Field(default=False, description="Local workers are processes, not threads.")
    dask_local: int | None = Field(default=None, ge=1, description="Start a dask LocalCluster of N workers.")
    dask_address: str | None = Field(default=None, description="Existing dask scheduler, tcp://host:port.")

    @model_validator(mode="after")
    def _one_cluster(self) -> "RunnerChoice":
        if self.dask_local is not None and self.dask_address is not None:
            raise ValueError("choose either dask_local or dask_address, not both")
        if self.dask_address is not None and "://" not in self.dask_address:
            raise ValueError(f"dask_address {self.dask_address!r}: expected a scheduler URL like tcp://host:8786")
        return self

    @property
    def uses_dask(self) -> bool:
        return self.dask_local is not None or self.dask_address is not None

    @property
    def tasks(self) -> int:
        """Shard tasks a flow keeps in flight: one per worker of a local Dask cluster, else ``workers``
        (set ``--workers`` to the size of an existing Dask cluster to use all of it)."""
        return self.dask_local if self.dask_local is not None else self.workers

    def describe(self) -> str:
        """One phrase for logs and summaries."""
        if self.dask_address is not None:
            return f"dask cluster at {self.dask_address}"
        if self.dask_local is not None:
            return f"local dask cluster of {self.dask_local} worker(s)"
        kind = "process" if self.processes else "thread"
        return f"{self.workers} local {kind}(s)"


EPHEMERAL_STARTUP_TIMEOUT_S = 180
"""How long a run waits for Prefect's embedded API server to start (unless the user set it)."""


def configure_prefect() -> None:
    """Point Prefect at an embedded API whose home lives in a temp folder, never the user's home.

    A user who configured a Prefect server (``PREFECT_API_URL``) or a home keeps it.
    """
    if not os.environ.get("PREFECT_HOME"):
        home = os.path.join(tempfile.gettempdir(), f"foresight-prefect-{os.getuid()}")
        os.makedirs(home, exist_ok=True)
        os.environ["PREFECT_HOME"] = home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_API_HOST", "127.0.0.1")
    # Prefect waits 20 s for its embedded server; a busy machine (a cluster node's other jobs, a
    # 2-core CI box) can take longer and the run then fails before any work.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))


def visible_gpus() -> int:
    """Number of CUDA devices this process may use (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_dask_cluster(n_workers: int, gpus: int | None = None, host: str = "127.0.0.1"):
    """A Dask cluster of ``n_workers`` single-threaded worker processes on this machine.

    With GPUs, worker ``i`` sees only GPU ``i % gpus`` (``CUDA_VISIBLE_DEVICES``) and declares
    one ``GPU`` resource, so ``device="cuda"`` in a task means that worker's own GPU.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    if not log.isEnabledFor(logging.INFO):
        # Worker processes read dask's logging config from the environment when they start; their
        # failed-task reports come back to the flow (and its log file) as exceptions.
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning" if debug_enabled() else "error")
        logging.getLogger("distributed").setLevel(logging.WARNING)
    gpus = visible_gpus() if gpus is None else gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
    workers = {}
    for index in range(n_workers):
        options: dict[str, Any] = {"nthreads": 1, "host": host}
        if gpus:
            options["resources"] = {GPU_RESOURCE: 1}
            options["env"] = {"CUDA_VISIBLE_DEVICES": devices[index % gpus]}
        workers[f"foresight-{index}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"host": host, "dashboard_address": ":0"}}
    log.info("starting a local dask cluster: %d worker(s), %d GPU(s)", n_workers, gpus)
    return SpecCluster(workers=workers, scheduler=scheduler, name="foresight-local")


def make_task_runner(choice: RunnerChoice):
    """The Prefect task runner for ``choice``."""
    if choice.dask_address is not None:
        from foresight.flows.dask_runner import GPUAwareDaskTaskRunner

        return GPUAwareDaskTaskRunner(address=choice.dask_address)
    if choice.dask_local is not None:
        from foresight.flows.dask_runner import GPUAwareDaskTaskRunner

        return GPUAwareDaskTaskRunner(cluster_class=local_dask_cluster,
                                      cluster_kwargs={"n_workers": choice.dask_local})
    if choice.processes:
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=choice.workers)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=choice.workers)


@contextlib.contextmanager
def stage_runners(choice: RunnerChoice) -> Iterator[Callable[[], Any]]:
    """A factory of task runners for several flows run one after another (a pipeline's stages).

    With ``dask_local`` one local cluster is started for all of them (not one per stage), so
    the workers and the models they cached survive from one stage to the next.
    """
    if choice.dask_local is None:
        yield lambda: make_task_runner(choice)
        return
    with local_dask_cluster(choice.dask_local) as cluster:
        shared = RunnerChoice(dask_address=cluster.scheduler_address)
        yield lambda: make_task_runner(shared)


@contextlib.contextmanager
def shared_api() -> Iterator[None]:
    """Make sure every process of a run reports to one Prefect API.

    Dask workers receive the flow's settings; with no ``PREFECT_API_URL`` configured they would
    each start their own embedded server. So the embedded server is started here and its URL
    put in the settings that travel with each task.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def debug_enabled() -> bool:
    """``foresight --debug``: tracebacks and engine logs on the terminal."""
    return bool(os.environ.get(DEBUG_ENV))


class _TerminalFilter(logging.Filter):
    """Keeps Prefect's and Dask's records, and any record carrying a traceback, off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            return False
        return not record.name.split(".", 1)[0] in ENGINE_LOGGERS


def _terminal_handlers() -> list[logging.Handler]:
    handlers = []
    for name in ("", *ENGINE_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handlers.append(handler)
    return handlers


class _RunLogHandler(logging.FileHandler):
    """The run's log file; a write that fails (a full disk) drops the record instead of printing
    logging's own traceback to the terminal."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.failed = True


def flow_run_name(flow_name: str) -> str:
    """``<flow>-<UTC time>-<6 hex>``: the Prefect flow-run name and the name of its log file."""
    return f"{flow_name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def flow_log(root: Root | None, run_name: str) -> Iterator[str]:
    """Send every log record of a flow run to ``<root>/logs/<run_name>.log`` (a temp folder without a
    local root; copied under the root afterwards when it is remote); yields the log's location.

    Unless ``--debug``, the terminal gets none of Prefect's or Dask's records and no traceback: a
    failure raises out of here with ``exc.log_path`` set, and the CLI prints one line naming it.
    """
    local = root is not None and root.is_local
    folder = root.path(LOGS_DIR) if local else os.path.join(tempfile.gettempdir(), "foresight-logs")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # e.g. the root's disk is full: the log goes to the temp folder instead
        local, folder = False, os.path.join(tempfile.gettempdir(), "foresight-logs")
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{run_name}.log")
    shown = root.url_of(LOGS_DIR, f"{run_name}.log") if local else path
    handler = _RunLogHandler(path, delay=True)  # no file unless something is logged
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quiet = None if debug_enabled() else _TerminalFilter()
    terminals = _terminal_handlers() if quiet is not None else []
    for terminal in terminals:
        terminal.addFilter(quiet)
    logging.getLogger().addHandler(handler)
    try:
        yield shown
    except BaseException as exc:
        logging.getLogger("foresight.flow").error("flow run %s failed", run_name, exc_info=exc)
        if root is not None:
            _name_full_disk(exc, root)
        with contextlib.suppress(OSError):
            handler.flush()
        if handler.failed:  # the root's disk is full: keep the traceback where it can be written
            shown = _fallback_log(run_name, exc) or shown
        with contextlib.suppress(AttributeError, TypeError):
            exc.log_path = shown
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        with contextlib.suppress(OSError):  # a full disk fails the last flush: the run's own error matters
            handler.close()
        if handler.failed and local:
            with contextlib.suppress(OSError):
                if os.path.getsize(path) == 0:
                    os.unlink(path)  # nothing reached it (the traceback went to the temp folder)
        for terminal in terminals:
            terminal.removeFilter(quiet)
        if root is not None and not local and os.path.exists(path):
            with contextlib.suppress(OSError):
                with open(path, "rb") as handle:
                    root.write_bytes_atomic(f"{LOGS_DIR}/{run_name}.log", handle.read())


def _fallback_log(run_name: str, exc: BaseException) -> str | None:
    """The traceback of a run whose own log could not be written, in the temp folder; its path."""
    path = os.path.join(tempfile.gettempdir(), "foresight-logs", f"{run_name}.log")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            traceback.print_exception(exc, file=handle)
    except OSError:
        return None
    return path


def _name_full_disk(exc: BaseException, root: Root) -> None:
    """A full disk met by a write that did not name its file (anywhere in the exception's chain)
    is given the data root it wrote under, so the one-line message can say where."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not exc.filename:
            exc.filename = root.url
        exc = exc.__cause__ or exc.__context__


def _flow_root(root: Root | None, params: dict[str, Any]) -> Root | None:
    """The data root a flow writes: the one given, else its ``root_url`` / ``root`` parameter."""
    if root is not None:
        return root
    url = params.get("root_url", params.get("root"))
    if isinstance(url, (str, os.PathLike, Root)):
        with contextlib.suppress(ValueError, OSError):
            return open_root(url)
    return None


def run_flow(flow: Any, choice: RunnerChoice | None = None, root: Root | None = None, /, **params: Any) -> Any:
    """Run a Prefect flow with the chosen task runner; returns the flow's return value.

    ``flow``, ``choice`` and ``root`` are positional-only, so a flow may have a ``root`` parameter.
    With ``root`` and an existing Dask cluster, the workers are first asked whether they can
    see a local root (they need a shared filesystem for it), so a wrong setup fails at once.
    The run's log records go to ``<root>/logs/<flow-run>.log`` (:func:`flow_log`).
    """
    choice = choice or RunnerChoice()
    runner = make_task_runner(choice)
    log.info("running flow %s on %s", flow.name, choice.describe())
    run_name = flow_run_name(flow.name)
    configured = flow.with_options(task_runner=runner, flow_run_name=run_name)
    with flow_log(_flow_root(root, params), run_name):
        if not choice.uses_dask:
            return configured(**params)
        if root is not None and choice.dask_address is not None:
            check_workers_see_root(choice.dask_address, root)
        with shared_api():
            return configured(**params)


def check_workers_see_root(address: str, root: Root) -> None:
    """ValueError when a worker of the cluster at ``address`` cannot see a local data root."""
    if not root.is_local:
        return  # object stores are reachable by URL from anywhere the credentials are
    from distributed import Client

    root.makedirs("")
    with Client(address, timeout=30) as client:
        seen = client.run(os.path.isdir, root.base)
    blind = sorted(worker for worker, ok in seen.items() if not ok)
    if blind:
        raise ValueError(f"data root {root.url}: not visible from dask worker(s) {', '.join(blind)}; "
                         "use a shared filesystem path or an object-store URL (s3://...) as --root")


def split_shards(shards: list[int], parts: int) -> list[list[int]]:
    """Contiguous, near-equal groups of shard indices, one per task (contiguous shards keep reads
    sequential)."""
    size = -(-len(shards) // max(parts, 1)) if shards else 0
    return [shards[i:i + size] for i in range(0, len(shards), size)] if size else []


def gather(futures: list[Any]) -> list[Any]:
    """Results of submitted task futures, in order; a failed task raises its exception."""
    return [future.result() for future in futures]


def progress_disabled() -> bool:
    """Progress bars are off with ``--quiet`` (``FORESIGHT_QUIET``) or when stderr is not a terminal."""
    import sys

    return bool(os.environ.get("FORESIGHT_QUIET")) or not sys.stderr.isatty()
