"""The Flower ServerApp: :func:`make_server_app` runs a :class:`ZOStrategy` in a ServerApp's main."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from ._environment import flower_environment
from .strategy import ZOStrategy

__all__ = ["make_server_app"]


def make_server_app(
    strategy: ZOStrategy,
    num_rounds: int,
    *,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    on_finish: Callable[[ZOStrategy, Result], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` whose main runs ``strategy.start(grid, num_rounds=num_rounds)``.

    ``evaluate_fn`` is passed to :meth:`ZOStrategy.start`; ``on_finish(strategy, result)`` is
    called after the final sync (e.g. to save the server replica's weights). A ServerApp that
    needs the run config (``flwr run``) builds its strategy in its own main and calls ``start``.
    """
    if not isinstance(num_rounds, int) or num_rounds < 0:
        raise ValueError(f"Invalid num_rounds: {num_rounds!r} (an int >= 0)")
    flower_environment()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = strategy.start(grid, num_rounds=num_rounds, evaluate_fn=evaluate_fn)
        if on_finish is not None:
            on_finish(strategy, result)

    return app


# ====================================================================== client side
