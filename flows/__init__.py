"""Prefect 3 flows and tasks: thin orchestration over storage and pipelines.

Prefect reads its settings when it is imported, so the embedded-API defaults (home outside the
user's home directory, no telemetry, quiet logs) are applied before any flow module loads.
"""

from foresight.flows.runtime import configure_prefect

configure_prefect()
