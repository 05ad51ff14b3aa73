"""Fault campaign (issues 10 and 23): kill, fill the disk, flip a byte; resume and compare.

Each run builds the whole chain (teleop ingest -> plan -> text -> generate -> dinov2 teacher ->
export, tiny models) into a fresh root with ``foresight run``; at a random moment the run is
SIGKILLed (on Dask: the flow process and one worker); then it is resumed with the same command.
Half the runs use local threads, half a real Dask cluster (``dask scheduler`` + 2 ``dask worker``
on loopback). A reader thread polls every root while it is written and checks every shard whose
``_done`` marker (or export index) it can see against the checksums recorded there.

Printed: how many runs ended byte-identical to the uninterrupted reference (every target shard
checksum and every export tar sha256), how many partial shards a reader could ever see (goal 0),
and the resume time against an uninterrupted run of the same mode measured just before it (the
machine is shared, so each run gets its own baseline). The kill moment is drawn uniformly from the
span in which the baseline was writing its root: after its start-up, before it exited.

    python bench/fault_campaign.py --runs 20 --seed 0 [--faults kill,disk-full,flip]

Issue 23 adds two faults (``--faults kill,disk-full,flip``, ``--runs`` of each, local threads):

- ``disk-full``: the root is a tmpfs of a random size (10-95% of what the finished chain needs); the
  run must fail with one ``error:`` line (no traceback) naming what it could not write, leave no
  temporary anywhere, and then, with the tmpfs grown, resume to a result byte-identical to the
  reference;
- ``flip``: at a random moment of the run one byte of a random *complete* shard (a target shard
  object behind a ``_done`` marker, or a shard of a complete export) is flipped; a stage that reads
  it must refuse with one line, and no other complete version or export may differ from the
  reference (nothing corrupt copied on); the flipped shard itself must be caught by the audit.

Printed for both: runs with one-line errors, stray temporaries (goal 0), complete outputs with
corrupt values (goal 0) and, for disk-full, resumes identical to the reference.

All processes run with one BLAS/OpenMP thread: on a CPU, torch's reductions depend on the thread
count, and Dask's nanny pins workers to one thread, so this makes local and Dask runs comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from cluster_servers import DaskCluster, child_env, start_prefect_server  # noqa: E402 - test servers, reused
from fixtures_sources import make_teleop_episode  # noqa: E402
from foresight.storage import layout  # noqa: E402
from foresight.storage.episodes import EpisodeStore  # noqa: E402
from foresight.storage.exports import ExportStore  # noqa: E402
from foresight.storage.fs import Root  # noqa: E402
from foresight.storage.targets import EMPTY_SHARD, TargetStore, shard_object  # noqa: E402

PIPELINE = """
name = "fault-campaign"
dataset = "toy"
[ingest]
kind = "teleop"
src = "{src}"
options = {{ fps = 10.0, instruction = "put the block in the drawer" }}
[plan]
frames = 4
stride = 2
every = 2
limit = {clips}
[text]
model = "tiny"
shard_size = 2
[generate]
model = "tiny"
params = {{ num_frames = 4, size = 32, steps = 4 }}
batch = 2
shard_size = 2
[[teachers]]
teacher = "dinov2"
model = "tiny"
batch = 2
[export]
codec = "f16"
shard_size = "256KB"
"""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass
class RunRecord:
    """One campaign run."""

    index: int
    mode: str
    baseline_s: float  # an uninterrupted run of the same mode, measured just before
    kill_at_s: float
    killed: bool
    interrupted_in: str
    resume_s: float
    identical: bool
    partial_visible: int
    checked: int
    problems: list[str] = field(default_factory=list)


class VisibilityReader(threading.Thread):
    """Polls a root the way a reader honouring the markers would, and checks what it sees.

    A shard counts as visible once its ``_done`` marker exists (targets), its export's
    ``index.json`` exists, or its episode's ``_COMPLETE`` marker exists. Every visible item is
    checked once against the checksums recorded for it; a mismatch is a partial shard a reader
    could have read.
    """

    def __init__(self, root: Root, poll_s: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.poll_s = root, poll_s
        self.seen: set[str] = set()
        self.manifests: dict[str, object] = {}  # array layouts never change: read each manifest once
        self.problems: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.scan()
            time.sleep(self.poll_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.scan()  # what is visible at the end is checked too

    def scan(self) -> None:
        try:
            self._scan_targets()
            self._scan_exports()
            self._scan_episodes()
        except FileNotFoundError:
            pass  # a folder appeared or moved mid-listing: the next poll sees it settled
        except (ValueError, OSError) as err:  # a published file a reader could not read
            self.problems.append(f"unreadable: {err}")

    def _check(self, key: str, problem: str | None) -> None:
        self.seen.add(key)
        if problem:
            self.problems.append(problem)

    def _scan_targets(self) -> None:
        store = TargetStore(self.root)
        for version in self.root.ls("targets"):
            if version not in self.manifests:
                if not self.root.exists(layout.target_dir(version), layout.MANIFEST):
                    continue
                self.manifests[version] = store.manifest(version)
            manifest = self.manifests[version]
            for name in self.root.ls(layout.target_dir(version), layout.DONE_DIR):
                key = f"{version}/{name}"
                if name.isdigit() and key not in self.seen:  # not the temporary files of atomic writes
                    self._check(key, self._shard_problem(manifest, int(name)))

    def _shard_problem(self, manifest, index: int) -> str | None:
        marker = f"{layout.target_dir(manifest.id)}/{layout.DONE_DIR}/{index}"
        try:
            recorded = self.root.read_json(marker)
        except ValueError as err:
            return f"{marker}: unreadable marker ({err})"
        # Markers hold {"sha256": {array: digest}, "xxh3_128": {...}} (older ones {array: digest}).
        digests = recorded["sha256"] if isinstance(recorded.get("sha256"), dict) else recorded
        for array, digest in digests.items():
            rel = shard_object(manifest, array, index)
            actual = self.root.sha256(rel) if self.root.exists(rel) else EMPTY_SHARD
            if actual != digest:
                return f"{manifest.id} shard {index} array {array}: stored object does not match its marker"
        return None

    def _scan_exports(self) -> None:
        for export in self.root.ls("exports"):
            key = f"export/{export}"
            if key in self.seen or not self.root.exists(layout.export_dir(export), layout.EXPORT_INDEX):
                continue
            index = self.root.read_json(layout.export_dir(export), layout.EXPORT_INDEX)
            bad = [s["name"] for s in index["shards"]
                   if self.root.sha256(layout.export_dir(export), s["name"]) != s["sha256"]]
            self._check(key, f"export {export}: shards {bad} differ from index.json" if bad else None)

    def _scan_episodes(self) -> None:
        for dataset in self.root.ls("datasets"):
            for episode in self.root.ls(layout.episodes_dir(dataset)):
                folder = layout.episode_dir(dataset, episode) if not episode.startswith(".") else None
                key = f"episode/{dataset}/{episode}"
                if folder is None or key in self.seen or not self.root.exists(folder, layout.COMPLETE_MARKER):
                    continue
                complete = all(self.root.exists(folder, name) for name in (layout.EPISODE_RECORD, layout.FRAMES))
                self._check(key, None if complete else f"episode {episode}: marked complete with files missing")


@dataclass
class FaultRecord:
    """One disk-full or flip run."""

    index: int
    fault: str
    detail: str  # tmpfs size, or what was flipped
    exit_code: int
    one_line: bool  # a failure printed exactly one `error:` line and no traceback
    message: str
    stray_temporaries: list[str]
    corrupt_outputs: list[str]  # complete versions/exports (other than a flipped shard's own) that differ
    checked: int  # complete versions and exports compared with the reference
    detected: bool  # flip: the audit (targets verify / export-check) names the flipped shard
    resumed_identical: bool | None  # disk-full: the resume with room again equals the reference


def stray_temporaries(root: Path) -> list[str]:
    """Writer temporaries anywhere under a root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*")) if root.exists() else []


def complete_outputs(root: Root) -> dict[str, object]:
    """Every complete target version (manifest) and export (index) under a root."""
    store, exports, found = TargetStore(root), ExportStore(root), {}
    for version in store.ids():
        try:
            manifest = store.manifest(version)
        except ValueError:
            continue
        if manifest.status == "complete":
            found[version] = manifest
    for export in exports.ids():
        found[export] = exports.index(export)
    return found


def corrupt_outputs(root: Root, reference: dict, skip: set[str]) -> tuple[list[str], int]:
    """Complete outputs whose stored bytes fail their own checksums, or whose checksums differ from
    the reference run's (corrupt values copied in with fresh checksums); ``skip``: a flipped one."""
    bad, outputs = [], complete_outputs(root)
    for output, record in outputs.items():
        if output in skip:
            continue
        if output.startswith("export-"):
            problems = ExportStore(root).verify(output)
            prints = [s.sha256 for s in record.shards]
        else:
            problems = TargetStore(root).open(output).verify()
            prints = TargetStore(root).shard_sums(record).by_shard()
        if problems or (output in reference and reference[output] != prints):
            bad.append(output)
    return bad, len(outputs)


def error_summary(err_path: Path, code: int) -> tuple[bool, str]:
    """(exactly one `error:` line and no traceback, that line) of a finished command's stderr."""
    text = err_path.read_text(errors="replace") if err_path.exists() else ""
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    if code == 0:
        return True, ""
    return len(errors) == 1 and "Traceback" not in text, (errors[0] if errors else text.strip()[-300:])


class Flipper(threading.Thread):
    """At ``at_s`` after start, flips one byte of a random complete shard of a root (waiting for one
    to exist); records what it flipped."""

    def __init__(self, root: Root, rng: random.Random, at_s: float):
        super().__init__(daemon=True)
        self.root, self.rng, self.at_s = root, rng, at_s
        self.flipped: tuple[str, str] | None = None  # (version or export id, description)
        self._stop_event = threading.Event()

    def run(self) -> None:
        if self._stop_event.wait(self.at_s):
            return
        while not self._stop_event.is_set() and self.flipped is None:
            candidates = self._candidates()
            if candidates:
                owner, path, what = self.rng.choice(candidates)
                data = bytearray(Path(path).read_bytes())
                offset = self.rng.randrange(len(data))
                data[offset] ^= 1 << self.rng.randrange(8)
                with open(path, "r+b") as handle:  # in place, like bit rot
                    handle.write(data)
                self.flipped = (owner, f"{what}, byte {offset}")
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def _candidates(self) -> list[tuple[str, str, str]]:
        found = []
        try:
            for version in self.root.ls("targets"):
                if not self.root.exists(layout.target_dir(version), layout.MANIFEST):
                    continue
                manifest = TargetStore(self.root).manifest(version)
                for name in self.root.ls(layout.target_dir(version), layout.DONE_DIR):
                    if not name.isdigit():
                        continue
                    for spec in manifest.arrays:
                        rel = shard_object(manifest, spec.name, int(name))
                        if self.root.exists(rel):
                            found.append((version, self.root.path(rel), f"{version} array {spec.name} shard {name}"))
            for export in ExportStore(self.root).ids():
                for shard in ExportStore(self.root).index(export).shards:
                    found.append((export, self.root.path(layout.export_dir(export), shard.name),
                                  f"{export} {shard.name}"))
        except (ValueError, OSError):
            return []  # a store mid-write: look again
        return found


def fingerprint(root: Root, summary: dict) -> dict:
    """What 'byte-identical' compares: every target shard checksum and every export tar sha256."""
    store, prints = TargetStore(root), {}
    for row in summary["stages"]:
        output = row["output"]
        if output.startswith(("text-", "video-", "teacher-")):
            manifest = store.manifest(output)
            prints[output] = store.shard_sums(manifest).by_shard() if manifest.status == "complete" else "incomplete"
        elif output.startswith("export-"):
            index = root.read_json(layout.export_dir(output), layout.EXPORT_INDEX)
            prints[output] = [s["sha256"] for s in index["shards"]]
    return prints


def interrupted_stage(root: Root, reference: dict) -> str:
    """The first stage of the chain whose output was not complete when the run was killed."""
    store = TargetStore(root)
    for row in reference["stages"]:
        output, stage = row["output"], row["stage"]
        if stage == "ingest":
            episodes = EpisodeStore(root, output)
            finished = episodes.exists() and len(episodes.episode_ids()) == 2 and episodes.info().stats is not None
        elif stage == "plan":
            finished = root.exists(layout.plan_dir(output), layout.PLAN_INFO)
        elif stage == "export":
            finished = root.exists(layout.export_dir(output), layout.EXPORT_INDEX)
        else:
            finished = store.status(output) == "complete"
        if not finished:
            return stage
    return "after export"


class Campaign:
    """The servers, the chain command and the reference results shared by every run."""

    def __init__(self, work: Path, clips: int, seed: int):
        self.work, self.rng = work, random.Random(seed)
        src = work / "teleop"
        for index in range(2):
            make_teleop_episode(src / f"episode_{index}.hdf5", length=24, cameras=("cam_high",), size=(32, 32))
        self.pipeline = work / "pipeline.toml"
        self.pipeline.write_text(PIPELINE.format(src=src, clips=clips))
        self.prefect, api = start_prefect_server(work)
        self.env = child_env(PREFECT_API_URL=api, **ONE_THREAD)
        self.cluster = DaskCluster(work, n_workers=2, env=ONE_THREAD)
        self.reference: dict = {}

    def stop(self) -> None:
        self.cluster.stop()
        self.prefect.stop()

    def start(self, root: Path, mode: str, log_name: str) -> subprocess.Popen:
        args = [sys.executable, "-c", "from foresight.flows.cli import main; main()", "-q", "run", str(self.pipeline),
                "--root", str(root), "--json"]
        if mode == "dask":
            args += ["--dask-address", self.cluster.address]
        return subprocess.Popen(args, stdout=open(self.work / f"{log_name}.out", "wb"),
                                stderr=open(self.work / f"{log_name}.err", "wb"), env=self.env,
                                start_new_session=True)

    def finish(self, proc: subprocess.Popen, log_name: str) -> dict:
        if proc.wait() != 0:
            raise RuntimeError(f"{log_name} failed:\n" + (self.work / f"{log_name}.err").read_text()[-4000:])
        return json.loads((self.work / f"{log_name}.out").read_text())

    def uninterrupted(self, mode: str, name: str) -> tuple[float, float, dict, dict]:
        """Wall time, the moment its root appeared (start-up done, writing begins), summary and
        fingerprint of an uninterrupted run in a fresh root."""
        root = self.work / name
        started = time.perf_counter()
        proc = self.start(root, mode, name)
        writing_at = None
        while proc.poll() is None:
            if writing_at is None and root.exists():
                writing_at = time.perf_counter() - started
            time.sleep(0.02)
        summary = self.finish(proc, name)
        seconds = time.perf_counter() - started
        return seconds, writing_at if writing_at is not None else 0.0, summary, fingerprint(Root(str(root)), summary)

    def kill(self, proc: subprocess.Popen, mode: str) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if mode == "dask":
            victim = self.rng.randrange(len(self.cluster.workers))
            os.kill(self.cluster.workers[victim].pid, signal.SIGKILL)
            self.cluster.restart_worker(victim)

    def disk_full_once(self, index: int) -> FaultRecord:
        """The chain on a tmpfs too small for it, then resumed with room."""
        size = max(int(self.rng.uniform(0.10, 0.95) * self.reference["bytes"]), 256 << 10)
        mount = self.work / f"diskfull-{index:02d}"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
        try:
            root = mount / "root"
            name = f"diskfull-{index:02d}"
            code = self.start(root, "local", name).wait()
            one_line, message = error_summary(self.work / f"{name}.err", code)
            if (root / "logs").exists():  # the run's log (its traceback) outlives the tmpfs
                shutil.copytree(root / "logs", self.work / f"{name}-logs", dirs_exist_ok=True)
            strays = stray_temporaries(root)
            bad, checked = corrupt_outputs(Root(str(root)), self.reference["fingerprint"], set())
            room = 4 * self.reference["bytes"] + (64 << 20)
            subprocess.run(["mount", "-o", f"remount,size={room}", str(mount)], check=True)
            summary = self.finish(self.start(root, "local", f"{name}-resume"), f"{name}-resume")
            identical = fingerprint(Root(str(root)), summary) == self.reference["fingerprint"]
            strays += [f"after resume: {s}" for s in stray_temporaries(root)]
            more, _ = corrupt_outputs(Root(str(root)), self.reference["fingerprint"], set())
        finally:
            subprocess.run(["umount", str(mount)], check=False)
        return FaultRecord(index=index, fault="disk-full", detail=f"tmpfs {size / 1e6:.1f} MB", exit_code=code,
                           one_line=one_line, message=message, stray_temporaries=strays,
                           corrupt_outputs=sorted(set(bad + more)), checked=checked, detected=True,
                           resumed_identical=identical)

    def flip_once(self, index: int) -> FaultRecord:
        """The chain with one byte of a random complete shard flipped at a random moment."""
        root = Root(str(self.work / f"flip-{index:02d}"))
        name = f"flip-{index:02d}"
        # Within the first 70% of the reference's writing span: under a varying load a later moment
        # often comes after the run has ended, and such a run exercises nothing.
        writing_at, seconds = self.reference["writing_at"], self.reference["seconds"]
        flipper = Flipper(root, self.rng, self.rng.uniform(writing_at, writing_at + 0.7 * (seconds - writing_at)))
        proc = self.start(Path(root.url), "local", name)
        flipper.start()
        code = proc.wait()
        flipper.stop()
        one_line, message = error_summary(self.work / f"{name}.err", code)
        owner, what = flipper.flipped or ("", "nothing (the run ended first)")
        bad, checked = corrupt_outputs(root, self.reference["fingerprint"], {owner})
        if not owner:
            detected = True
        elif owner.startswith("export-"):
            detected = bool(ExportStore(root).verify(owner))
        else:
            detected = bool(TargetStore(root).open(owner).verify())
        return FaultRecord(index=index, fault="flip", detail=what, exit_code=code, one_line=one_line,
                           message=message, stray_temporaries=stray_temporaries(Path(root.url)),
                           corrupt_outputs=bad, checked=checked, detected=detected, resumed_identical=None)

    def run_once(self, index: int, mode: str) -> RunRecord:
        """An uninterrupted run (the same-run baseline), then a run killed at a random moment of
        that duration and resumed; both compared with the reference run."""
        base_s, writing_at, _, base_print = self.uninterrupted(mode, f"baseline-{index:02d}-{mode}")
        root = Root(str(self.work / f"run-{index:02d}-{mode}"))
        reader = VisibilityReader(root)
        reader.start()
        kill_at = self.rng.uniform(writing_at, base_s)  # while the baseline was writing its root
        proc = self.start(Path(root.url), mode, f"run-{index:02d}")
        started = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - started < kill_at:
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            self.kill(proc, mode)
        stage = interrupted_stage(root, self.reference["summary"])
        resumed = time.perf_counter()
        summary = self.finish(self.start(Path(root.url), mode, f"resume-{index:02d}"), f"resume-{index:02d}")
        resume_s = time.perf_counter() - resumed
        reader.stop()
        identical = fingerprint(root, summary) == self.reference["fingerprint"] == base_print
        return RunRecord(index=index, mode=mode, baseline_s=round(base_s, 2), kill_at_s=round(kill_at, 2),
                         killed=killed, interrupted_in=stage, resume_s=round(resume_s, 2), identical=identical,
                         partial_visible=len(reader.problems), checked=len(reader.seen), problems=reader.problems)


def report(records: list[RunRecord]) -> str:
    lines = ["| run | mode | uninterrupted (s) | killed at (s) | interrupted in | resume (s) | resume / uninterrupted "
             "| identical | partial visible / checked |", "|---:|---|---:|---:|---|---:|---:|:---:|---:|"]
    for r in records:
        lines.append(f"| {r.index} | {r.mode} | {r.baseline_s:.1f} | {r.kill_at_s:.1f}"
                     f"{'' if r.killed else ' (finished first)'} | {r.interrupted_in} | {r.resume_s:.1f} | "
                     f"{r.resume_s / r.baseline_s:.2f} | {'yes' if r.identical else 'NO'} | "
                     f"{r.partial_visible} / {r.checked} |")
    lines.append("")
    for mode in ("local", "dask"):
        ratios = [r.resume_s / r.baseline_s for r in records if r.mode == mode]
        if ratios:
            lines.append(f"- {mode}: resume / uninterrupted median **{statistics.median(ratios):.2f}x** "
                         f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} runs)")
    lines.append(f"- byte-identical to the reference: **{sum(r.identical for r in records)}/{len(records)}**; "
                 f"partial shards visible to a reader: **{sum(r.partial_visible for r in records)}** "
                 f"(of {sum(r.checked for r in records)} markers, indexes and episodes checked)")
    return "\n".join(lines)


def fault_report(records: list[FaultRecord]) -> str:
    lines = ["| run | fault | detail | exit | one line | message | stray temporaries | corrupt complete outputs "
             "| detected | resumed identical |", "|---:|---|---|---:|:---:|---|---:|---:|:---:|:---:|"]
    for r in records:
        resumed = "-" if r.resumed_identical is None else ("yes" if r.resumed_identical else "NO")
        lines.append(f"| {r.index} | {r.fault} | {r.detail} | {r.exit_code} | {'yes' if r.one_line else 'NO'} | "
                     f"{r.message[:110].replace('|', '/')} | {len(r.stray_temporaries)} | "
                     f"{len(r.corrupt_outputs)} / {r.checked} | {'yes' if r.detected else 'NO'} | {resumed} |")
    lines.append("")
    for fault in ("disk-full", "flip"):
        rows = [r for r in records if r.fault == fault]
        if not rows:
            continue
        failed = [r for r in rows if r.exit_code != 0]
        if fault == "flip":
            lines.append(f"- flip: a byte was flipped in {sum(not r.detail.startswith('nothing') for r in rows)} of "
                         f"{len(rows)} runs (in the others the run ended before the drawn moment)")
        text = (f"- {fault}: {len(rows)} runs, {len(failed)} failed, of which {sum(r.one_line for r in failed)} with "
                f"one `error:` line; stray temporaries **{sum(len(r.stray_temporaries) for r in rows)}**; corrupt "
                f"values in complete versions/exports **{sum(len(r.corrupt_outputs) for r in rows)}** "
                f"(of {sum(r.checked for r in rows)} checked)")
        if fault == "disk-full":
            text += f"; resumes identical to the reference **{sum(bool(r.resumed_identical) for r in rows)}/{len(rows)}**"
        else:
            text += f"; flipped shards caught by the audit **{sum(r.detected for r in rows)}/{len(rows)}**"
        lines.append(text)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="Runs of each fault (kill: half local, half Dask).")
    parser.add_argument("--faults", default="kill", help="Comma list of kill, disk-full, flip.")
    parser.add_argument("--clips", type=int, default=16, help="Clips of the tiny chain (2 per shard).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments and killed workers.")
    parser.add_argument("--work", default=None, help="Work folder (default: a temporary one).")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="foresight-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - {"kill", "disk-full", "flip"})
    if unknown:
        parser.error(f"--faults: unknown {unknown}")
    campaign = Campaign(work, args.clips, args.seed)
    records: list[RunRecord] = []
    fault_records: list[FaultRecord] = []
    try:
        seconds, writing_at, summary, prints = campaign.uninterrupted("local", "reference")
        campaign.reference = {"summary": summary, "fingerprint": prints, "seconds": seconds, "writing_at": writing_at,
                              "bytes": Root(str(work / "reference")).du("")}
        print(f"reference (local, uninterrupted): {seconds:.1f} s, {campaign.reference['bytes'] / 1e6:.1f} MB",
              flush=True)
        for fault in ("disk-full", "flip"):
            for index in range(args.runs if fault in faults else 0):
                record = campaign.disk_full_once(index) if fault == "disk-full" else campaign.flip_once(index)
                fault_records.append(record)
                print(f"{fault} {index:2d}: {record.detail}: exit {record.exit_code}, one line {record.one_line}, "
                      f"strays {len(record.stray_temporaries)}, corrupt {len(record.corrupt_outputs)}/{record.checked}, "
                      f"detected {record.detected}, resumed identical {record.resumed_identical} | "
                      f"{record.message[:160]}", flush=True)
        for index in range(args.runs if "kill" in faults else 0):
            mode = "local" if index % 2 == 0 else "dask"
            record = campaign.run_once(index, mode)
            records.append(record)
            print(f"run {index:2d} {mode:5s}: uninterrupted {record.baseline_s:5.1f} s, killed at "
                  f"{record.kill_at_s:5.1f} s in {record.interrupted_in:15s} resume {record.resume_s:5.1f} s "
                  f"identical={record.identical} partial={record.partial_visible}/{record.checked}", flush=True)
    finally:
        campaign.stop()
    if records:
        print(report(records))
    if fault_records:
        print(fault_report(fault_records))
    (work / "fault_campaign.json").write_text(json.dumps([asdict(r) for r in records + fault_records], indent=2))
    print(f"records: {work / 'fault_campaign.json'}")


if __name__ == "__main__":
    main()
