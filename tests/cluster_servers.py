"""Real servers on loopback for the cluster tests: Prefect (SQLite), Dask, and S3 (moto).

Each server is a subprocess started by the tests and stopped by them (by its own pid). The
Prefect server is shared by every test of a session: starting one costs ~15 s on a loaded
machine, and without it each flow process would start its own embedded server.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of every subprocess: repo and tests importable, quiet Prefect."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.update(extra)
    return env


class Server:
    """A subprocess with its log file; stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def wait_until(check, what: str, server: Server | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and not server.alive():
            raise RuntimeError(f"{what}: process exited early:\n{server.log_text()[-3000:]}")
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet: poll again
        time.sleep(0.3)
    tail = server.log_text()[-3000:] if server is not None else ""
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s\n{tail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def start_prefect_server(log_dir: Path) -> tuple[Server, str]:
    """``prefect server start`` on loopback with its own SQLite database; returns (server, api_url)."""
    port = free_port()
    home = log_dir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = child_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                    PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db")
    env.pop("PREFECT_API_URL", None)
    server = Server("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], log_dir, env)
    api_url = f"http://127.0.0.1:{port}/api"
    wait_until(lambda: http_ok(f"{api_url}/health"), "prefect server", server)
    return server, api_url


_SHARED: dict[str, object] = {}


def shared_prefect_api(log_dir: Path) -> str:
    """One Prefect server for the whole test session; this process and its children use it."""
    if "url" not in _SHARED:
        log_dir = Path(log_dir) / "shared-prefect"
        log_dir.mkdir(parents=True, exist_ok=True)
        server, url = start_prefect_server(log_dir)
        atexit.register(server.stop)
        _SHARED.update(server=server, url=url)
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = str(log_dir / "client-home")
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect read its settings at import: point this process's settings at the server too.
        context = temporary_settings(updates={PREFECT_API_URL: url})
        context.__enter__()
        _SHARED["context"] = context
    return str(_SHARED["url"])


class DaskCluster:
    """A real ``dask scheduler`` and ``dask worker`` processes (no nanny: a killed worker stays dead)."""

    def __init__(self, log_dir: Path, n_workers: int = 2, resources: list[str | None] | None = None,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.env = env or {}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.scheduler = Server("dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                                   "--port", str(self.port), "--no-dashboard"], log_dir, child_env())
        wait_until(lambda: _port_open(self.port), "dask scheduler", self.scheduler)
        self.resources = resources or [None] * n_workers  # per worker, e.g. "GPU=1"
        self.workers = [self._start_worker(i) for i in range(n_workers)]
        self.wait_for_workers(n_workers)

    def _start_worker(self, index: int) -> Server:
        argv = [str(BIN / "dask"), "worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                "--name", f"worker-{index}", "--host", "127.0.0.1"]
        if self.resources[index]:
            argv += ["--resources", self.resources[index]]
        return Server(f"dask-worker-{index}", argv, self.log_dir, child_env(**self.env))

    def restart_worker(self, index: int) -> None:
        """Replace worker ``index`` (e.g. after killing it) and wait until the scheduler sees it."""
        self.workers[index].stop()
        self.workers[index] = self._start_worker(index)
        self.wait_for_workers(len(self.workers))

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(count, timeout=START_TIMEOUT_S)

    def worker_pids(self) -> dict[int, Server]:
        return {w.pid: w for w in self.workers if w.alive()}

    def stop(self) -> None:
        for server in [*self.workers, self.scheduler]:
            server.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class MotoS3:
    """moto's S3 server mode on loopback, with the environment s3fs needs to talk to it."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_ENDPOINT_URL_S3": self.endpoint}
        self.server = Server("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                             log_dir, child_env())
        wait_until(lambda: http_ok(f"{self.endpoint}/moto-api/"), "moto server", self.server)

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def moto_bucket(log_dir: Path, bucket: str):
    """A moto S3 server with ``bucket`` made; this process (and its children) talk to it through the
    AWS variables, which are restored afterwards."""
    server = MotoS3(log_dir)
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
