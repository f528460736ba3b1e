"""The README's scale-out commands, run as written on a two-node cluster simulated on this machine.

The commands are read from README.md between its `scale-out commands` markers, so the README is
held to them. Each simulated node is a shell of its own, with a home directory of its own (a
fresh machine: no ~/.ray/auth_token) and its own session; the only changes to the text are the
placeholders HEAD_IP and TOKEN and the head's port (6379 may be taken on a shared machine). Then
a driver with the head's token joins and runs a task on each node, a client without it is
refused, and both nodes are stopped by their session ids (never `ray stop`, which would stop every
Ray on the machine).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rl.core.paths import PROJECT_ROOT
from rl.loop.local_cluster import session_members

pytestmark = pytest.mark.slow

START, END = "<!-- scale-out commands", "<!-- end of scale-out commands -->"


def readme_commands() -> tuple[list[str], list[str]]:
    """(head node lines, other node lines) of the README's scale-out block, comments dropped."""
    text = (PROJECT_ROOT / "README.md").read_text()
    assert START in text and END in text, "README.md lost its scale-out command markers"
    block = text[text.index(START):text.index(END)]
    block = block[block.index("```bash") + len("```bash"):block.rindex("```")]
    parts, current = {}, None
    for line in block.strip().splitlines():
        if line.startswith("# on the head node"):
            current = parts.setdefault("head", [])
        elif line.startswith("# on every other node"):
            current = parts.setdefault("other", [])
        elif line.strip() and current is not None:
            current.append(line)
    return parts["head"], parts["other"]


def _ray_address_file() -> str | None:
    """What `ray.init()` without an address would join on this machine (None: start its own)."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    return path.read_text() if path.exists() else None


def _free_port() -> int:
    while True:  # above Ray's worker port range (10002-19999)
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port > 20000:
            return port


def _stop_session(sid: int) -> None:
    """Every process a node's shell started (Ray's daemons keep the shell's session)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
        for pid in session_members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while any(not _zombie(p) for p in session_members(sid)) and time.time() < deadline:
            time.sleep(0.3)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


DRIVER = """
import json, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
where = ray.remote(lambda: ray.get_runtime_context().get_node_id())
print(json.dumps(ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes])))
"""


def _node_env(home: Path) -> dict:
    """A simulated machine: `ray` from this environment, a home of its own (no token, as on a machine
    that never ran Ray) and a temporary directory of its own: Ray keeps its sessions there and the
    address `ray.init()` joins by default (ray_current_cluster), which must not point the rest of
    the test session, or anyone else on this machine, at this short-lived cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), "RAY_TMPDIR": str(home / "tmp"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def test_readme_scale_out_commands_start_a_two_node_token_cluster(tmp_path):
    import ray

    head_lines, other_lines = readme_commands()
    assert any("ray get-auth-token --generate" in line for line in head_lines)  # the step a fresh machine needs
    head_ip, port = ray.util.get_node_ip_address(), _free_port()
    sessions = []
    # Short paths: Ray's unix sockets live under each node's temporary directory (108 bytes at most).
    homes = Path(tempfile.mkdtemp(prefix="rl-nodes-", dir="/tmp"))

    def node(name: str, lines: list[str], **fill) -> subprocess.CompletedProcess:
        home = homes / name
        (home / "tmp").mkdir(parents=True)
        script = "\n".join(lines).replace("6379", str(port))
        for placeholder, value in fill.items():  # whole words: RAY_AUTH_TOKEN is not the placeholder TOKEN
            script, count = re.subn(rf"\b{placeholder}\b", value, script)
            assert count, f"the README's commands lost {placeholder}"
        proc = subprocess.Popen(["bash", "-ec", script], cwd=home, env=_node_env(home), start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sessions.append(proc.pid)
        out, err = proc.communicate(timeout=180)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    try:
        head = node("head", head_lines)
        assert head.returncode == 0, head.stderr[-3000:]
        token = (homes / "head" / ".ray" / "auth_token").read_text().strip()
        assert token and token in head.stdout  # what the README tells the operator to pass on
        other = node("other", other_lines, TOKEN=token, HEAD_IP=head_ip)
        assert other.returncode == 0, other.stderr[-3000:]
        assert not (homes / "other" / ".ray" / "auth_token").exists()  # the token came as RAY_AUTH_TOKEN

        address = f"{head_ip}:{port}"
        assert (homes / "head" / "tmp" / "ray" / "ray_current_cluster").read_text().strip() == address
        head_env = {**_node_env(homes / "head"), "RAY_AUTH_MODE": "token"}
        deadline = time.time() + 90
        while True:  # the second node registers with the head a moment after its `ray start` returns
            status = subprocess.run(["ray", "status", f"--address={address}"], env=head_env, capture_output=True,
                                    text=True, timeout=120)
            active = status.stdout.split("Pending:")[0]
            if status.returncode == 0 and len(re.findall(r"^\s*1 node_\w+", active, re.M)) == 2:
                break
            assert time.time() < deadline, status.stdout + status.stderr[-2000:]
            time.sleep(2)
        # Token authentication is on: a client without the token is refused.
        (homes / "stranger" / "tmp").mkdir(parents=True)
        refused = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, text=True, timeout=120,
                                 env={**_node_env(homes / "stranger"), "RAY_AUTH_MODE": "token"})
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

        # A driver on the head node (whose environment holds the token, as the launcher's does) joins
        # it and runs a task on each node. A real launch across two nodes: tests/integration/test_multinode.py.
        driver = subprocess.run([sys.executable, "-c", DRIVER, address], env=head_env, capture_output=True, text=True,
                                timeout=180)
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert len(set(json.loads(driver.stdout.strip().splitlines()[-1]))) == 2, driver.stdout
    finally:
        for sid in sessions:
            _stop_session(sid)
        shutil.rmtree(homes, ignore_errors=True)
    assert all(_zombie(p) for sid in sessions for p in session_members(sid))  # nothing of the cluster is left
    assert _ray_address_file() != address  # `ray.init()` elsewhere on this machine is not pointed at it
