"""A real GRPO step on a two-node Ray cluster simulated on this machine, joined with `ray.address`.

Each simulated node offers one CPU, so the plan's engine bundle and learner bundle cannot share a
node: the engine generates on one node and the learner trains on the other, and the weights
pushed across are checked by the after-push log-prob comparison. The cluster lives in a
subprocess (this file run as a script) so that the test session's own Ray is left alone.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl.core.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_grpo_step_on_two_nodes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 2
    assert result["launch_rc"] == 0, result["launch_stderr"]
    # The printed plan: engine 0 and learner 0 on different nodes.
    nodes = dict(re.findall(r"^\s+(engine|learner)\s+0\s+node \S+ \((\w+)\)", result["launch_stderr"], re.M))
    assert len(nodes) == 2 and nodes["engine"] != nodes["learner"], result["launch_stderr"][-2000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert records[0]["logprob_gap"] < 1e-4 and records[0]["grad_norm"] > 0


def _two_node_run(root: Path) -> dict:
    os.environ["RAY_AUTH_MODE"] = "token"  # this Ray refuses a second node without it (platform.md)
    from ray.cluster_utils import Cluster

    from rl.demo.tiny import addition_task

    model, data = addition_task(root, warmup_steps=20, n_rows=64)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, include_dashboard=False))
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        overrides = [
            f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
            "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", "train.steps=1",
            "train.prompts_per_step=8", "learner.micro_batch_size=32", "learner.lr=1e-3", "reward.workers=0",
            f"tracking.output_dir={root / 'runs'}", "tracking.run_name=run", f"ray.address={cluster.address}",
        ]
        launch = subprocess.run(
            [sys.executable, "-m", "rl.launch", *overrides], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=800
        )
        return dict(nodes=len(cluster.list_all_nodes()), launch_rc=launch.returncode, launch_stderr=launch.stderr[-20000:])
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    print(json.dumps(_two_node_run(Path(sys.argv[1]))))
