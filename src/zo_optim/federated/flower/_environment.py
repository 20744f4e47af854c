"""Flower's process environment for our runs (one switch, called wherever a run starts)."""

from __future__ import annotations

import os

__all__ = ["flower_environment"]


def flower_environment() -> None:
    """Switch off Flower's telemetry and update check (``setdefault``: an explicit user choice wins).

    Called wherever a run starts (the ServerApp, the ClientApp, :meth:`ZOStrategy.start`): federated
    nodes often have no route to the internet, and the check would only add start-up latency.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
