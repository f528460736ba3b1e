"""A Ray cluster on this machine that lives exactly as long as the launcher that started it.

`ray.init(address="local")` in the launcher itself would start Ray's processes as its children:
Ray ties the GCS and the raylet to it (a parent-death signal), but not the raylet's children (the
dashboard and runtime-env agents, the workers), which outlive a launcher killed with SIGKILL (an
OOM killer, a scheduler's hard stop) by minutes. So the launcher starts a small host process in a
session of its own instead. The host starts the cluster (every Ray process, workers included, stays in
the host's session), tells the launcher its address, and waits
for the launcher to go: the pipe to its stdin closes when the launcher exits in any way, and a
pidfd on the launcher's pid reports its death too. Then it stops its process group (SIGTERM: the
raylet stops its workers) and, after a grace period, kills whatever is left of its session (Ray
gives each worker a process group of its own, in the same session): nothing of the cluster is
left, whatever signal ended the launcher. The launcher joins the cluster like any other
(ray.init(address=...)). No process is looked up by name.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time

GRACE_S = 2.0  # from SIGTERM (Ray's processes stop cleanly) to SIGKILL of whatever is left


class ClusterError(ConnectionError):
    """The Ray cluster could not be joined or started (the message says why and what to do)."""


class LocalCluster:
    """The launcher's handle: the host process and the address of the cluster it runs."""

    def __init__(self, num_cpus: int, timeout_s: float = 180.0):
        self.host = subprocess.Popen(
            [sys.executable, "-m", "rl.loop.local_cluster", str(os.getpid()), str(num_cpus)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )
        # The host's process group: the cluster's processes, for tests and for stop().
        self.pgid = self.host.pid
        ready, _, _ = select.select([self.host.stdout], [], [], timeout_s)
        line = self.host.stdout.readline() if ready else b""
        self.host.stdout.close()
        try:
            started = json.loads(line)
            self.address, auth_mode = started["address"], started["auth_mode"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise ClusterError(
                f"Could not start a Ray cluster on this machine within {timeout_s:.0f} s (its host process "
                f"{'exited with code ' + str(self.host.returncode) if self.host.poll() is not None else 'gave no address'}; "
                "Ray's own error is printed above). Check that /tmp has space and that no firewall blocks "
                "local ports, or start one yourself (`ray start --head`) and launch with ray.address=auto."
            ) from None
        if auth_mode and os.environ.get("RAY_AUTH_MODE") != auth_mode:
            # What ray.init does when it starts a cluster itself: the mode in the environment, and
            # Ray's cached config (read when ray was imported) refreshed from it.
            os.environ["RAY_AUTH_MODE"] = auth_mode
            from ray._raylet import Config

            Config.initialize("")

    def stop(self) -> None:
        """Stop the cluster now (it stops by itself when this process exits)."""
        if self.host.poll() is None:
            self.host.stdin.close()  # the host stops the cluster and exits
            try:
                self.host.wait(timeout=GRACE_S + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pgid, signal.SIGKILL)
                self.host.wait()


def _wait_for_launcher_exit(launcher_pid: int) -> None:
    """Until stdin reaches end of file (the launcher closed it, or exited and the kernel closed it)
    or the launcher's pid ends."""
    watched = [sys.stdin.fileno()]
    try:
        pidfd = os.pidfd_open(launcher_pid)
        watched.append(pidfd)
    except (AttributeError, OSError):  # no pidfd (old kernel): the pipe alone tells
        pidfd = None
    while True:
        ready, _, _ = select.select(watched, [], [])
        if pidfd in ready or not os.read(sys.stdin.fileno(), 4096):
            return


def _host(launcher_pid: int, num_cpus: int) -> None:
    import logging

    import ray

    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                   logging_level=logging.ERROR)
    # After ray.init, which installs its own handler: the SIGTERM the host sends its process group
    # below must not end the host before it sends SIGKILL. (The launcher's Ctrl-C is for the
    # launcher alone: the host is in another session and never sees it.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with os.fdopen(os.dup(1), "w") as out:
        # A new local cluster turns on Ray's token authentication unless RAY_AUTH_MODE says
        # otherwise; the launcher joins it in the same mode (with the same ~/.ray token).
        out.write(json.dumps({"address": ctx.address_info["gcs_address"], "auth_mode": os.environ.get("RAY_AUTH_MODE")}) + "\n")
    # Nobody reads the pipe after the address, and the launcher's console is not the place for
    # what Ray's processes print as they are stopped after the launcher is gone.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        _wait_for_launcher_exit(launcher_pid)
    finally:
        # The GCS, the raylet and its agents are in the host's process group: SIGTERM lets the raylet
        # stop its workers. Ray puts each worker in a process group of its own, in the host's
        # session: whatever of the session is left after the grace period is killed.
        os.killpg(0, signal.SIGTERM)
        time.sleep(GRACE_S)
        for pid in session_members(os.getsid(0)):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def session_members(sid: int) -> list[int]:
    """The processes of session `sid` (by their session id in /proc, never by their names)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    found.append(int(entry))
    return found


if __name__ == "__main__":
    _host(int(sys.argv[1]), int(sys.argv[2]))
