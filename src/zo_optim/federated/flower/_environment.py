"""Flower's process environment for our runs (one switch, called wherever a run starts) and our loggers."""

from __future__ import annotations

import logging
import os

from flwr.common.logger import LOGGER_NAME

__all__ = ["flower_environment", "flower_logger"]


def flower_logger(name: str) -> logging.Logger:
    """The logger ``flwr.zo_optim.<name>``: a child of Flower's own logger, so its records go through the handlers
    Flower configures — its console handler at INFO in simulation, the stream ``flwr run --stream`` shows in
    deployment — without the user configuring ``logging``. (A ``zo_optim.*`` logger shows nothing until someone
    configures logging, which a ServerApp's user rarely does.) ``logging.getLogger("flwr.zo_optim")`` tunes or
    silences them all."""
    return logging.getLogger(f"{LOGGER_NAME}.zo_optim.{name}")


def flower_environment() -> None:
    """Switch off Flower's telemetry and update check (``setdefault``: an explicit user choice wins).

    Called wherever a run starts (the ServerApp, the ClientApp, :meth:`ZOStrategy.start`): federated
    nodes often have no route to the internet, and the check would only add start-up latency.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
