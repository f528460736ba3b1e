"""Launches that used to hang or leave processes behind, run as an operator runs them (`python -m
rl.launch` in a subprocess, real Ray): a resource plan that cannot fit is refused in seconds, for
CPU bundles (a cluster the launch starts itself) as for GPU ones (a cluster that declares GPUs it
does not have); an address where no cluster answers fails in seconds; a launcher killed with
SIGKILL mid-run takes the cluster it started with it."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rl.core.paths import PROJECT_ROOT
from rl.demo.tiny import addition_rows
from rl.loop.local_cluster import session_members

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("hangs") / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(64, seed=5)))
    return tiny_model, data


def _args(task, out, *extra):
    model, data = task
    return [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", "train.prompts_per_step=4",
        "learner.micro_batch_size=16", "sync.check_sequences=0", "train.save_final=false",
        f"tracking.output_dir={out}", "tracking.run_name=run", *extra,
    ]


def _env(**extra):
    # RAY_ADDRESS=local: a cluster of its own, even if someone ran `ray start` on this machine.
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RAY_ADDRESS": "local", **extra}


def _descendants(pid):
    """pid's children, their children, ...: from /proc/PID/task/*/children."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task_dir in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task_dir}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
    return out


def _kill_sessions(sids):
    """Only if a test failed: never leave a run behind."""
    for sid in sids:
        for pid in session_members(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _launch_to_end(cmd, env, timeout_s, cwd=PROJECT_ROOT):
    """Run a launch that must end by itself within timeout_s; return (exit code, output, seconds)."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out = ""
    finally:
        deadline = time.time() + 10  # what the launch started stops with it
        while (left := _running(session_members(proc.pid))) and time.time() < deadline:
            time.sleep(0.5)
        _kill_sessions([proc.pid])
    assert proc.returncode is not None, f"still running after {timeout_s} s: it hangs"
    return proc.returncode, out, time.time() - started, left


def _one_paragraph_error(out):
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
    return errors[0]


def test_cpu_plan_beyond_the_machine_is_refused_in_seconds(task, tmp_path):
    cmd = [sys.executable, "-m", "rl.launch", *_args(task, tmp_path, "rollout.num_engines=64")]
    code, out, seconds, left = _launch_to_end(cmd, _env(), timeout_s=120)
    error = _one_paragraph_error(out)
    cores = len(os.sched_getaffinity(0))
    assert code == 2
    assert "needs 65 CPU (64 engines x 1 CPU + 1 learner ranks x 1 CPU" in error, error
    assert f"this machine has {cores} cores" in error and f"at most {max(4, 2 * cores)} CPU" in error
    assert seconds < 90 and left == [], (seconds, left)  # refused before a cluster started: nothing left


_GPU_LAUNCH = """
import sys
import ray
# A cluster that declares 1 GPU it does not have: Ray accounts for it as for a real one.
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
from rl.launch import main
sys.exit(main(sys.argv[1:]))
"""


def test_gpu_plan_beyond_the_cluster_is_refused_with_the_figures(task, tmp_path):
    # Two engines of one GPU and a learner rank of one: 3 GPUs, on a cluster of one.
    cmd = [sys.executable, "-c", _GPU_LAUNCH, *_args(task, tmp_path, "rollout.num_engines=2")]
    code, out, seconds, left = _launch_to_end(cmd, _env(), timeout_s=120)
    error = _one_paragraph_error(out)
    assert code == 2
    assert "does not fit the Ray cluster. It needs 3 GPU and 3 CPU in 3 bundles" in error, error
    assert "The cluster has: node 0: 2 CPU, 1 GPU" in error
    assert seconds < 90 and left == []


def test_absent_cluster_fails_in_seconds_naming_the_address(task, tmp_path):
    cmd = [sys.executable, "-m", "rl.launch", *_args(task, tmp_path, "ray.address=127.0.0.1:9")]
    code, out, seconds, left = _launch_to_end(cmd, _env(), timeout_s=120)
    error = _one_paragraph_error(out)
    assert code == 2
    assert "ray.address='127.0.0.1:9'" in error and "ray start --head" in error, error
    assert "GCS" not in out  # none of Ray's time-out warnings
    assert seconds < 60 and left == []


def test_sigkilled_launcher_leaves_no_process_of_its_cluster(task, tmp_path):
    """SIGKILL (an OOM killer, a scheduler's hard stop) once the engines and learner ranks are up:
    every process of the run, found by descent from the launcher and by their sessions, is gone
    within 20 s."""
    log_path = tmp_path / "console.log"
    cmd = [sys.executable, "-m", "rl.launch", *_args(task, tmp_path, "train.steps=200")]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sessions = {proc.pid}
    try:
        deadline = time.time() + 400
        while "weight sync:" not in log_path.read_text():  # printed once engines and learners are up
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the run never started"
            time.sleep(0.2)
        time.sleep(1)  # into its first step
        run = set(_descendants(proc.pid))
        for pid in run:
            with contextlib.suppress(OSError):
                sessions.add(os.getsid(pid))
        run |= {pid for sid in sessions for pid in session_members(sid)}
        assert len(run) >= 4, run  # the Ray processes, the engine and the learner rank at least
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while (left := _running(run | {p for sid in sessions for p in session_members(sid)})) and time.time() < deadline:
            time.sleep(0.5)
        assert left == [], [_cmdline(p) for p in left]
    finally:
        _kill_sessions(sessions)


def _running(pids):
    return sorted(p for p in pids if _alive(p))


def _alive(pid):
    """A process that runs (a zombie waiting for its parent to read its exit status has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid):
    return f"{pid}: {_title(pid)[:120] or 'gone'}"


def test_joined_cluster_outlives_a_sigkilled_launcher_but_its_actors_go(task, tmp_path):
    """On a cluster someone else started (`ray start --head`), a launcher killed with SIGKILL
    takes only its own actors with it (Ray ends a dead driver's actors); the cluster stays."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    env = _env(RAY_AUTH_MODE="disabled")  # as anyone may start it: no token needed here
    env.pop("RAY_ADDRESS")
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                             "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    log_path = tmp_path / "console.log"
    proc = None
    try:
        deadline = time.time() + 120
        while not _answers(port):
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        cluster = set(session_members(head.pid))
        cmd = [sys.executable, "-m", "rl.launch", *_args(task, tmp_path, "train.steps=200", f"ray.address=127.0.0.1:{port}")]
        with log_path.open("w") as log:
            proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.time() + 400
        while "weight sync:" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the run never started"
            time.sleep(0.2)
        time.sleep(1)
        # The run's actors: new workers in the cluster's session, each in a process group of its own (the
        # GCS, the raylet and its agents share the `ray start` process's group), named `ray::<Actor class>`.
        # A `ray::IDLE` worker is the raylet's pool, which it keeps for the next job: the cluster's, not ours.
        workers = {p for p in set(session_members(head.pid)) - cluster if _pgid(p) not in (None, head.pid)}
        actors = {p for p in workers if _title(p).startswith("ray::") and _title(p) != "ray::IDLE"}
        assert len(actors) >= 2, [_cmdline(p) for p in workers]  # an engine and a learner rank at least
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while (left := _running(actors)) and time.time() < deadline:
            time.sleep(0.5)
        assert left == [], [_cmdline(p) for p in left]
        # The cluster is left alone: `ray start --block` would have exited had any of its processes died.
        time.sleep(2)
        assert head.poll() is None and _answers(port)
    finally:
        _kill_sessions([head.pid] + ([proc.pid] if proc else []))


def _title(pid):
    """The process title Ray sets on a worker (`ray::IDLE`, `ray::EngineActor.generate`, ...)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline") as f:
        return f.read().replace(chr(0), " ").strip()
    return ""


def _pgid(pid):
    with contextlib.suppress(OSError):
        return os.getpgid(pid)
    return None


def _answers(port):
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False
