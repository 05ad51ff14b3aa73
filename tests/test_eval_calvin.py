"""CALVIN's protocol statistics and the import check that names what to install."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from foresight.flows.cli import app
from foresight.flows.cli.common import user_error_message
from foresight.pipelines.eval.calvin import chain_statistics, missing_calvin_modules


def test_average_length_and_success_at_k():
    stats = chain_statistics([5, 3, 0, 4])
    assert stats["average_length"] == 3.0
    assert [stats[f"success_{k}"] for k in range(1, 6)] == [0.75, 0.75, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="0..5"):
        chain_statistics([6])


def test_calvin_check_names_what_to_install():
    result = CliRunner().invoke(app, ["eval", "calvin-check"])
    if not missing_calvin_modules():
        assert result.exit_code == 0
        return
    message = user_error_message(result.exception)
    assert result.exit_code != 0 and "calvin_env" in message and "github.com/mees/calvin" in message
