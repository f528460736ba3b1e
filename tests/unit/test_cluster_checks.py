"""The checks that keep a launch from hanging, as pure logic: a plan's CPUs against a machine's
cores (for a cluster the launch starts itself), and a cluster address that nobody answers."""
import socket
import time

import pytest

from rl.loop.local_cluster import ClusterError
from rl.loop.placement import PlacementError, ResourcePlan
from rl.loop.cluster import check_reachable


def plan(**kw) -> ResourcePlan:
    base = dict(num_engines=1, gpus_per_engine=1, engine_cpus=1, num_learners=1, learner_cpus=1, mode="split", on_gpu=False)
    return ResourcePlan.build(**{**base, **kw})


def test_local_cluster_gets_the_cores_and_shares_them_two_to_one():
    assert plan().local_cpus(cores=16) == 16  # the machine's cores, when the plan needs fewer
    assert plan(num_learners=2).local_cpus(cores=2) == 3  # default plans on the smallest machine
    assert plan(num_engines=2, num_learners=2).local_cpus(cores=1) == 4  # at least 4 CPUs
    assert plan(num_engines=7, num_learners=1).local_cpus(cores=4) == 8


def test_local_plan_beyond_the_machine_is_refused_with_the_figures():
    with pytest.raises(PlacementError) as e:
        plan(num_engines=64).local_cpus(cores=2)
    msg = str(e.value)
    assert "needs 65 CPU (64 engines x 1 CPU + 1 learner ranks x 1 CPU" in msg
    assert "at most 4 CPU" in msg and "2 cores" in msg and "rollout.num_engines" in msg and "ray.address" in msg
    # Colocated bundles count the same reservations; fractional ones add up exactly.
    with pytest.raises(PlacementError, match="needs 18 CPU"):
        plan(num_engines=8, num_learners=8, mode="colocate", engine_cpus=1.25, learner_cpus=1).local_cpus(cores=8)
    assert plan(num_engines=2, engine_cpus=0.5, learner_cpus=0.5).local_cpus(cores=1) == 2


def test_address_nobody_answers_fails_in_seconds_naming_it():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    with pytest.raises(ClusterError) as e:
        check_reachable(f"127.0.0.1:{port}")
    assert time.time() - started < 6
    msg = str(e.value)
    assert f"ray.address='127.0.0.1:{port}'" in msg and "ray start --head" in msg and "\n" not in msg
    with socket.socket() as server:  # one that listens passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    check_reachable("auto")  # Ray looks this one up itself
