"""The CALVIN long-horizon evaluation protocol: what it measures, and the check that its simulator exists.

Protocol (mees/calvin, ``calvin_models/calvin_agent/evaluation/evaluate_policy.py``): 1,000 chains
of 5 language-conditioned subtasks (``get_sequences(1000)``, fixed by the protocol's seed), each
chain starting from its sampled initial scene; every subtask gets at most 360 steps and succeeds when
the task oracle reports it from the env's info; a chain stops at its first failed subtask. Reported:
the rate of chains that completed at least k subtasks, k = 1..5, and the **average length** (mean
subtasks completed per chain, 0..5; S-VAM ABC->D 4.16).

The simulator, ``calvin_env``, is not published on the package index, so it cannot be installed here;
:func:`require_calvin_env` says exactly what a user needs (README: "CALVIN evaluation").
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence

NUM_CHAINS = 1000
CHAIN_LENGTH = 5
SUBTASK_STEPS = 360
CALVIN_MODULES = ("calvin_env", "calvin_agent")
"""calvin_env: the PyBullet play table; calvin_agent (calvin_models): get_sequences and the task oracle."""


def missing_calvin_modules() -> list[str]:
    """The CALVIN packages that cannot be imported in this environment."""
    return [name for name in CALVIN_MODULES if importlib.util.find_spec(name) is None]


def require_calvin_env() -> None:
    """ValueError naming what to install when the CALVIN simulator is not importable."""
    missing = missing_calvin_modules()
    if missing:
        raise ValueError(
            f"CALVIN evaluation needs {', '.join(missing)} (not on the package index): git clone --recurse-submodules "
            "https://github.com/mees/calvin, then pip install -e calvin/calvin_env/tacto -e calvin/calvin_env "
            "-e calvin/calvin_models into this environment, and pass --dataset-path to the split's validation "
            "folder (its .hydra/ config builds the env)")


def chain_statistics(completed: Sequence[int], chain_length: int = CHAIN_LENGTH) -> dict[str, float]:
    """CALVIN's report from subtasks completed per chain: success rate of >= k subtasks, and the average length."""
    if not completed:
        raise ValueError("calvin: no chains to summarise")
    bad = [n for n in completed if not 0 <= n <= chain_length]
    if bad:
        raise ValueError(f"calvin: chains completed {bad[:5]} subtasks, expected 0..{chain_length}")
    stats = {f"success_{k}": sum(n >= k for n in completed) / len(completed) for k in range(1, chain_length + 1)}
    stats["average_length"] = sum(completed) / len(completed)
    stats["chains"] = float(len(completed))
    return stats
