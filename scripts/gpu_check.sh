#!/usr/bin/env bash
# Placement and learner checks on a machine with CUDA GPUs (no vLLM needed: engines are the HF one).
#
#   bash scripts/gpu_check.sh            # from the project root, in an env with torch (CUDA), ray, deepspeed, transformers, peft
#
# 1. The resource plan on the real GPUs: colocate (1 GPU is enough) and, with >= 2 GPUs, split;
#    every actor sees exactly the GPUs the printed plan names.
# 2. Learner ranks on CUDA (NCCL), bf16, ZeRO-2 and ZeRO-3: a step trains and stays finite.
# 3. The collective weight sync into an HF engine, bit for bit: through host memory (gloo, and the
#    shared-memory file colocated runs use on one node) when colocated, GPU to GPU (NCCL) when split
#    (>= 2 GPUs).
# Prints one PASS/FAIL line per check and exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "${PYTHON:-python}" - <<'EOF'
import os, sys, tempfile, traceback

import ray
import torch

from rl.config import LearnerConfig
from rl.learner.group import LearnerGroup
from rl.loop.placement import ResourcePlan
from rl.demo.tiny import build_model
from rl.sync.weight_sync import CollectiveSync, SharedMemorySync
from rollouts.pool import RolloutPool
from tests.batches import varied_batch

assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
gpus = torch.cuda.device_count()
failures = []


def check(name, fn):
    try:
        fn()
        print(f"PASS {name}", flush=True)
    except Exception:
        failures.append(name)
        print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


def loss(out, mb):
    logp = torch.log_softmax(out.logits().float(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    return -(mb.token_fields["advantages"] * logp * mb.completion_mask).sum() / mb.loss_normalizer, {}


model = str(build_model(tempfile.mkdtemp() + "/tiny", arch="llama", tied=False))
ray.init(include_dashboard=False, log_to_driver=False)
modes = ["colocate"] + (["split"] if gpus >= 2 else [])


def run(mode, stage, dtype):
    learners_n = 1 if mode == "colocate" or gpus < 3 else 2
    plan = ResourcePlan.build(num_engines=1, gpus_per_engine=1, engine_cpus=1, num_learners=learners_n,
                              learner_cpus=1, mode=mode, on_gpu=True).apply()
    print(plan.table(), flush=True)
    pool = RolloutPool("hf", model, placement=plan, max_model_len=64, dtype=dtype)
    learners = LearnerGroup(model, LearnerConfig(num_learners=learners_n, zero_stage=stage, micro_batch_size=2, lr=1e-3),
                            dtype, seed=0, total_steps=2, placement=plan)
    try:
        seen = pool.apply(lambda e: (os.environ.get("CUDA_VISIBLE_DEVICES"), str(e.device)))[0]
        assert seen[0] == ",".join(map(str, plan.gpu_ids(plan.engines[0]))) and seen[1].startswith("cuda"), seen
        syncs = [CollectiveSync(pool, learners, bucket_mb=1, nccl=mode == "split")]
        if mode == "colocate":
            syncs.append(SharedMemorySync(pool, learners))
        for sync in syncs:
            metrics = learners.train_step(varied_batch(0, 1.0), loss)
            assert torch.isfinite(torch.tensor(metrics["loss"])), metrics
            sync.push()
            want = learners.full_state_dict()
            got = pool.apply(lambda e: {k: v.detach().cpu() for k, v in e.model.state_dict().items()})[0]
            bad = [k for k in want if not torch.equal(got[k], want[k])]
            assert not bad, f"{type(sync).__name__}: engine differs from the learner in {bad[:3]}"
    finally:
        pool.close()
        learners.close()
        plan.release()


for mode in modes:
    for stage in (2, 3):
        for dtype in ("bfloat16", "float32"):
            check(f"{mode} zero{stage} {dtype}: placement, NCCL learners, weight sync", lambda: run(mode, stage, dtype))
ray.shutdown()
print(f"{len(failures)} failed" if failures else "all passed")
sys.exit(1 if failures else 0)
EOF
