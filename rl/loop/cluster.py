"""The Ray cluster a run uses (joined, or started on this machine and stopped with the launcher),
and the run's resource plan on it."""
from __future__ import annotations

import logging
import os
import sys

from rl.config import RunConfig
from rl.core.paths import PROJECT_ROOT


def init_ray(cfg: RunConfig, scoring=()) -> None:
    """Join the cluster `ray.address` (or RAY_ADDRESS) names, else start one on this machine (sized
    for the plan, with the algorithm's `scoring` engines)."""
    import ray

    from rl.loop.local_cluster import ClusterError, LocalCluster

    if ray.is_initialized():
        return
    # Workers must import this checkout's code: a local cluster's workers inherit the driver's
    # environment, an existing cluster's get it through the job's runtime environment (every node
    # needs the project at the same path, or installed).
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # Actors' output stays in their log files (copied to <run>/logs) unless tracking.verbose.
    quiet = dict(log_to_driver=cfg.tracking.verbose, logging_level=logging.INFO if cfg.tracking.verbose else logging.ERROR)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # Ray's own word for "start a cluster here"
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}, **quiet)
        except ConnectionError as e:
            raise ClusterError(
                f"Could not join the Ray cluster at ray.address={address!r}: {e}. Start it first (`ray start "
                "--head` on one node, `ray start --address=HEAD_IP:6379` on the others), or leave ray.address "
                "unset (and RAY_ADDRESS empty) to start a cluster on this machine."
            ) from e
        return
    from rl.loop.placement import ResourcePlan

    # Refused before anything starts if the plan needs more CPUs than this machine can share out.
    num_cpus = ResourcePlan.from_config(cfg, on_gpu=False, scoring=scoring).local_cpus(len(os.sched_getaffinity(0)))
    # A cluster that dies with this process, whatever ends it (rl/loop/local_cluster.py).
    global _local_cluster
    if _local_cluster is not None:  # one this process started before and disconnected from
        _local_cluster.stop()
    _local_cluster = LocalCluster(num_cpus)
    ray.init(address=_local_cluster.address, **quiet)


_local_cluster = None  # the cluster init_ray started on this machine, if any


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address must answer within seconds: Ray itself would retry an absent GCS for
    minutes, printing time-out warnings."""
    import socket

    from rl.loop.local_cluster import ClusterError

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto" and the like: Ray finds the cluster itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"No Ray cluster answers at ray.address={address!r} ({host}:{port}: "
            f"{e.strerror or type(e).__name__} within {timeout_s:.0f} s). Start it first (`ray start --head "
            "--port=6379` on the head node, `ray start --address=HEAD_IP:6379` on the others) and give the head "
            "node's address, or leave ray.address unset (and RAY_ADDRESS empty) to start a cluster on this machine."
        ) from None


def place(cfg: RunConfig, scoring=()):
    """The run's resource plan (with the algorithm's `scoring` engines), checked against the cluster
    and reserved; printed."""
    import ray

    from rl.loop.placement import ResourcePlan

    plan = ResourcePlan.from_config(cfg, on_gpu=ray.cluster_resources().get("GPU", 0) > 0, scoring=scoring).apply()
    print(plan.table(), file=sys.stderr, flush=True)
    return plan
