"""The start-up probe of conditional create (storage.fs.Root.require_conditional_create): shard
claims are exclusive only where "create unless it exists" is honoured, so a writable object-store
root is probed once per process and bucket, against moto's S3 server on loopback."""

from __future__ import annotations

import logging

import pytest

import foresight.storage.fs
from cluster_servers import moto_bucket
from foresight.flows.cli.common import user_error_message
from foresight.storage.fs import UNSAFE_CLAIMS_ENV, Root

BUCKET = "probe-bucket"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_bucket(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    monkeypatch.setattr(foresight.storage.fs, "_PROBED", {})


def ignore_conditional_create(monkeypatch, root: Root) -> list[str]:
    """Make ``root``'s filesystem drop ``mode="create"`` as an S3 endpoint ignoring If-None-Match does;
    returns the paths written, in order."""
    written, plain_pipe = [], root.fs.pipe_file

    def pipe_file(path, data, mode="overwrite", **kwargs):
        written.append(path)
        return plain_pipe(path, data, **kwargs)

    monkeypatch.setattr(root.fs, "pipe_file", pipe_file)
    return written


def test_moto_honours_conditional_create_and_the_probe_leaves_nothing(moto):
    root = Root(f"s3://{BUCKET}/honoured")
    root.check_writable()
    assert foresight.storage.fs._PROBED == {("s3", moto.endpoint, BUCKET): True}
    assert root.fs.find(f"{BUCKET}/honoured") == []


def test_the_probe_runs_once_per_process_and_bucket(moto, monkeypatch):
    first = Root(f"s3://{BUCKET}/a")
    first.require_conditional_create()
    second = Root(f"s3://{BUCKET}/b")
    written = ignore_conditional_create(monkeypatch, second)  # would fail, were it probed again
    second.require_conditional_create()
    assert written == []


def test_a_store_that_ignores_it_is_refused_in_one_line_naming_the_endpoint(moto, monkeypatch):
    root = Root(f"s3://{BUCKET}/ignored")
    written = ignore_conditional_create(monkeypatch, root)
    with pytest.raises(ValueError) as refused:
        root.check_writable()
    message = user_error_message(refused.value)
    assert "\n" not in message and f"the object store at {moto.endpoint} does not honour conditional create" in message
    assert "a second create of one object succeeded" in message and UNSAFE_CLAIMS_ENV in message
    assert sum(".probe-create-" in path for path in written) == 2 and root.fs.find(f"{BUCKET}/ignored") == []


def test_the_documented_fallback_turns_the_refusal_into_a_warning(moto, monkeypatch, caplog):
    root = Root(f"s3://{BUCKET}/unsafe")
    ignore_conditional_create(monkeypatch, root)
    monkeypatch.setenv(UNSAFE_CLAIMS_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="foresight.storage.fs"):
        root.check_writable()
    assert "does not honour conditional create" in caplog.text and f"{UNSAFE_CLAIMS_ENV}=1: going on" in caplog.text


def test_local_roots_are_not_probed(tmp_path):
    Root(tmp_path).check_writable()  # os.link is exclusive on every local filesystem
    assert foresight.storage.fs._PROBED == {}
