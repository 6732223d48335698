"""Connecting to Ray: an embedded local instance by default, a cluster when asked."""
from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join `address` (or RAY_ADDRESS) if given, else start Ray inside this process.

    Idempotent: tests share one Ray instance per session by initializing it first.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {
        "logging_level": logging.WARNING if quiet else logging.INFO,
        "log_to_driver": True,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        # a local run stays on loopback and opens no dashboard: nothing for the network to reach
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    ctx = ray.data.DataContext.get_current()
    # our jobs draw their own progress (in samples, not blocks); Ray Data's per-operator
    # bars would interleave with it
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))
