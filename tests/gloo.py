"""Real gloo process groups for the multi-process tests: a free port, and one rank's group as a context."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist

from zo_optim.bench.net import free_port  # re-exported: the rendezvous / torchrun master port

__all__ = ["free_port", "gloo_group"]




@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: float | None = 60.0) -> Iterator[None]:
    """This rank in a gloo group on 127.0.0.1:``port`` (one torch thread per rank on the small CI machine).

    ``timeout_s`` bounds every collective, so a rank left alone in one fails the test instead of hanging
    it; ``None`` keeps torch's default.
    """
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()
