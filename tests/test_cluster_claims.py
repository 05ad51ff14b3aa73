"""Shard claims (exclusive, expiring, taken over from dead claimers), the per-process model
cache, and the shared runner options: fast, in-process and on loopback only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import typer
from typer.testing import CliRunner

from cluster_servers import child_env
from foresight.flows.cli.runner import runner_options
from foresight.flows.models_cache import ModelCache, model_key
from foresight.flows.runtime import RunnerChoice
from foresight.storage.claims import (ClaimRecord, ClaimSet, ShardClaim, active_claims, claimer_alive, create_exclusive,
                            current_claim, machine_id, wait_for_shards)
from foresight.storage.fs import Root

VERSION = "text-0123456789ab"


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return Root(str(tmp_path / "root"))
    return Root(f"memory://claims-{os.getpid()}-{time.monotonic_ns()}")


def test_exclusive_create_has_one_winner(root):
    results = []
    barrier = threading.Barrier(8)

    def race(index: int) -> None:
        barrier.wait()
        results.append((index, create_exclusive(root, "x/marker", f"{index}".encode())))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, won in results if won]
    assert len(winners) == 1
    assert root.read_bytes("x/marker") == str(winners[0]).encode()


def test_racing_claimers_one_owner_then_released(root):
    claims = [ShardClaim(root, VERSION, 0, ttl_s=30) for _ in range(6)]
    barrier = threading.Barrier(len(claims))
    won = []

    def race(claim: ShardClaim) -> None:
        barrier.wait()
        if claim.acquire():
            won.append(claim)

    threads = [threading.Thread(target=race, args=(c,)) for c in claims]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert set(active_claims(root, VERSION)) == {0}
    won[0].release()
    generation, record = current_claim(root, VERSION, 0)
    assert record.state == "released" and generation == 1 and active_claims(root, VERSION) == {}


def _foreign_record(expires_in: float) -> ClaimRecord:
    now = time.time()
    return ClaimRecord(state="held", owner="other", host="elsewhere", machine="elsewhere/boot/1", pid=1,
                       pid_start="1", acquired=now, expires=now + expires_in)


def test_claim_of_another_machine_expires(root):
    rel = f"targets/{VERSION}/_claims/3/00000000"
    root.write_bytes_atomic(rel, _foreign_record(30).model_dump_json().encode())
    with ClaimSet(root, VERSION, ttl_s=5).hold(3) as owned:
        assert owned is None  # alive on another machine: only its expiry frees it
    root.write_bytes_atomic(rel, _foreign_record(-1).model_dump_json().encode())
    with ClaimSet(root, VERSION, ttl_s=5).hold(3) as owned:
        assert owned is not None and owned.generation == 1


def test_heartbeat_keeps_claim_and_detects_takeover(tmp_path):
    root = Root(str(tmp_path / "root"))
    holder = ShardClaim(root, VERSION, 1, ttl_s=0.6)
    assert holder.acquire()
    time.sleep(1.5)  # well past the ttl: only the heartbeat keeps it
    assert not ShardClaim(root, VERSION, 1, ttl_s=0.6).acquire()
    holder._stop.set()  # a stalled holder: no more renewals
    holder._heartbeat.join()
    time.sleep(0.8)
    thief = ShardClaim(root, VERSION, 1, ttl_s=5)
    assert thief.acquire()
    holder.renew()
    assert holder.lost
    holder.release()  # a lost claim publishes nothing
    assert current_claim(root, VERSION, 1)[1].owner == thief.owner
    thief.release()


def test_claim_of_a_killed_process_is_taken_over_at_once(tmp_path):
    root = Root(str(tmp_path / "root"))
    code = ("import sys, time; from foresight.storage.claims import ShardClaim; "
            f"c = ShardClaim({root.url!r}, {VERSION!r}, 2, ttl_s=600); assert c.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=child_env())
    assert child.stdout.readline().strip() == "held"
    record = current_claim(root, VERSION, 2)[1]
    assert record.pid == child.pid and record.machine == machine_id() and claimer_alive(record)
    assert not ShardClaim(root, VERSION, 2).acquire()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not claimer_alive(record)
    taker = ShardClaim(root, VERSION, 2)
    assert taker.acquire()  # a 600 s claim, free as soon as its process is gone
    taker.release()


def test_claim_skips_done_shard_and_releases_on_error(tmp_path):
    root = Root(str(tmp_path / "root"))
    with ClaimSet(root, VERSION, is_done=lambda shard: True).hold(0) as owned:
        assert owned is None
    assert current_claim(root, VERSION, 0) == (-1, None)
    with pytest.raises(RuntimeError):
        with ClaimSet(root, VERSION).hold(0) as owned:
            assert owned is not None
            raise RuntimeError("shard failed")
    assert current_claim(root, VERSION, 0)[1].state == "released"


def test_wait_for_shards_runs_free_and_waits_for_held():
    done: set[int] = set()
    held = {1}
    runs: list[list[int]] = []

    def run_missing(shards: list[int]) -> None:
        runs.append(shards)
        done.update(shards)

    def release_later() -> None:
        time.sleep(0.3)
        held.clear()  # the other builder died or released without finishing shard 1

    threading.Thread(target=release_later).start()
    wait_for_shards(lambda: [i for i in range(3) if i not in done], lambda: set(held), run_missing, poll_s=0.05)
    assert runs == [[0, 2], [1]]
    with pytest.raises(TimeoutError, match="shards \\[0\\]"):
        wait_for_shards(lambda: [0], lambda: {0}, run_missing, poll_s=0.01, timeout_s=0.05)


def test_model_cache_loads_once_per_key_across_threads():
    cache = ModelCache(max_models=2)
    loads = []

    def load(name: str):
        def loader():
            time.sleep(0.05)
            loads.append(name)
            return object()
        return loader

    key_a = model_key("svd", "tiny", "cpu", "fp32", {"seed": 0})
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(key_a, load("a")))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["a"] and len({id(r) for r in results}) == 1
    assert cache.stats.loads == 1 and cache.stats.hits == 3
    assert model_key("svd", "tiny", "cpu", "fp32", {"seed": 1}) != key_a  # settings are part of the key
    cache.get(model_key("dinov2", "tiny", "cpu", "fp32"), load("b"))
    cache.get(model_key("da3", "tiny", "cpu", "fp32"), load("c"))
    assert cache.stats.evictions == 1 and key_a not in cache.keys()  # least recently used went first


def test_runner_options_parse_and_validate():
    app = typer.Typer()
    seen: list[RunnerChoice] = []

    @app.command()
    @runner_options
    def build(plan: str = typer.Option(..., "--plan"), runner: RunnerChoice = None) -> None:
        seen.append(runner)

    cli = CliRunner()
    assert cli.invoke(app, ["--plan", "p", "--dask-local", "2"]).exit_code == 0
    assert cli.invoke(app, ["--plan", "p", "--dask-address", "tcp://10.0.0.1:8786"]).exit_code == 0
    assert cli.invoke(app, ["--plan", "p"]).exit_code == 0
    assert [c.dask_local for c in seen] == [2, None, None]
    assert seen[1].dask_address == "tcp://10.0.0.1:8786" and seen[2] == RunnerChoice()
    both = cli.invoke(app, ["--plan", "p", "--dask-local", "2", "--dask-address", "tcp://h:1"])
    assert both.exit_code != 0 and "exclude each other" in str(both.exception)
    assert "--dask-address" in cli.invoke(app, ["--help"]).output
    with pytest.raises(ValueError, match="tcp://host:8786"):
        RunnerChoice(dask_address="10.0.0.1:8786")


def test_gpu_tasks_are_recognised_by_their_device_parameters():
    from foresight.flows.dask_runner import wants_gpu
    from foresight.flows.generate import TextConfig

    assert wants_gpu({"device": "cuda:1", "shard": 3})
    assert wants_gpu({"root_url": "x", "config": TextConfig(plan="p", model="tiny", device="cuda")})
    assert not wants_gpu({"config": TextConfig(plan="p", model="tiny"), "device_count": "cuda"})


def test_runner_options_refuse_a_command_declaring_them_itself():
    def generate(workers: int = typer.Option(1, "--workers"), runner: RunnerChoice = None) -> None:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="'workers' declares \\['--workers'\\]"):
        runner_options(generate)
