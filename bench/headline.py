"""Headline figures of a benchmark run, written to ``bench/results/<bench>.json`` so a run can be
compared with the last one without reading prose: the card, torch version, foresight's commit,
the date, and the benchmark's named figures (e.g. ``action_expert_fed``, ``teachers_disk_ratio``)."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def card() -> str:
    """The GPU a run measured (``cpu`` without one)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def write_headline(bench: str, figures: dict[str, Any], out: Path | None = None, **context: Any) -> Path:
    """Write ``figures`` (name -> number or small dict) with the run's context to
    ``bench/results/<bench>.json`` (or ``out``) and return the path. ``context`` adds fields such
    as the command's arguments."""
    import torch

    from foresight.storage.provenance import git_commit

    record = {"bench": bench, "card": card(), "torch": torch.__version__, "commit": git_commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **context, "figures": figures}
    path = Path(out) if out is not None else RESULTS_DIR / f"{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
