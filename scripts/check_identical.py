"""Do GRPO, OPSD, IGPO and diffu-GRPO train bit-identically across a refactor?

    PYTHONPATH=. python scripts/check_identical.py out=/tmp/after.json [methods=grpo,opsd] [steps=2]
    PYTHONPATH=. python scripts/check_identical.py compare=/tmp/before.json,/tmp/after.json

Each method runs `steps` steps of the real loop with the settings of its end-to-end test
(tests/integration/test_grpo_end_to_end.py, test_opsd.py, test_igpo_end_to_end.py), one method at
a time, each in a fresh process. The JSON holds every step's metrics (timings dropped: they are
the only values that may differ) and a sha256 of the final parameters. Tiny models are built once
into `models=` (default /tmp/check_identical_models), so a before/after pair trains the same
weights. `compare=` prints every difference and exits 1 if there is any.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# grpo_options runs the paths behind the policy scores (old log-probs for mu > 1, the entropy
# filter, importance weights) and the reference KL, which the plain GRPO test leaves off.
METHODS = ("grpo", "grpo_options", "opsd", "igpo", "diffu_grpo", "diffu_grpo_masks")
GRPO_OPTIONS = ["grpo.kl_coef=0.05", "grpo.updates_per_batch=2", "grpo.entropy_top_fraction=0.5",
                "grpo.importance_sampling=token"]


def _overrides(method: str, models: Path, out: Path, steps: int) -> tuple[str | None, list[str]]:
    run = [f"train.steps={steps}", f"tracking.output_dir={out}", "tracking.run_name=run"]
    if method in ("grpo", "grpo_options"):
        from rl.demo.tiny import addition_task

        root = models / "addition"
        if not (root / "done").exists():
            addition_task(root, warmup_steps=130, n_rows=2000)
            (root / "done").touch()
        model, data = root / "model", root / "train.jsonl"
        extra = GRPO_OPTIONS if method == "grpo_options" else []
        return None, [
            f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
            "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=8", "train.prompts_per_step=64",
            "learner.micro_batch_size=256", "learner.lr=1e-3", *extra, *run,
        ]
    if method == "opsd":
        from rl.demo.tiny import addition_rows, build_model

        model, data = models / "opsd_model", models / "opsd_train.jsonl"
        if not (models / "opsd_done").exists():
            build_model(model, arch="qwen3", tied=True)
            rows = [{**r, "problem": r["question"], "solution": f"{r['question']}{r['answer']}"}
                    for r in addition_rows(500, seed=3)]
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            (models / "opsd_done").touch()
        return "opsd_smollm2", [
            f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=200",
            "rollout.max_tokens=8", "rollout.kv_cache_gb=0.25", "opsd.clip=null", "learner.lr=3e-3",
            "learner.max_grad_norm=1.0", "learner.warmup_steps=0", "learner.micro_batch_size=32", "reward.workers=0",
            "train.prompts_per_step=32", *run,
        ]
    if method == "diffu_grpo_masks":  # d1's fresh prompt mask per inner update, with reference KL
        return "diffu_grpo_tiny", ["diffu_grpo.prompt_mask_prob=0.15", "diffu_grpo.updates_per_batch=2",
                                   "diffu_grpo.kl_coef=0.01", "train.prompts_per_step=64", "learner.lr=3e-4", *run]
    # The end-to-end test runs diffu_grpo from igpo_tiny with algorithm=diffu_grpo; since a recipe
    # carries only its own algorithm's section, diffu_grpo_tiny holds the same settings.
    recipe = "diffu_grpo_tiny" if method == "diffu_grpo" and (PROJECT_ROOT / "recipes/diffu_grpo_tiny.yaml").exists() else "igpo_tiny"
    return recipe, [f"algorithm={method}", "train.prompts_per_step=64", "learner.lr=3e-4", *run]


def _is_timing(key: str) -> bool:
    return key.startswith("time/") or key.endswith("_s") or key == "wall_time"


def _param_hash(final: Path) -> str:
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for f in sorted(final.glob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def run_one(method: str, models: Path, steps: int) -> dict:
    from rl.config import load_config
    from rl.loop.trainer import train

    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        recipe, overrides = _overrides(method, models, Path(tmp), steps)
        cfg = load_config(recipe, overrides)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        train(cfg, run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        metrics = [{k: v for k, v in r.items() if not _is_timing(k)} for r in records]
        return {"metrics": metrics, "params_sha256": _param_hash(run_dir / "final")}


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differences = 0
    for method in sorted(set(a) | set(b)):
        if method not in a or method not in b:
            print(f"{method}: only in {'before' if method in a else 'after'}")
            differences += 1
            continue
        same_params = a[method]["params_sha256"] == b[method]["params_sha256"]
        diffs = []
        for step, (x, y) in enumerate(zip(a[method]["metrics"], b[method]["metrics"]), 1):
            for key in sorted(k for k in set(x) | set(y) if not _is_timing(k)):
                if x.get(key, "<absent>") != y.get(key, "<absent>"):
                    diffs.append(f"step {step} {key}: {x.get(key, '<absent>')} -> {y.get(key, '<absent>')}")
        if len(a[method]["metrics"]) != len(b[method]["metrics"]):
            diffs.append("different number of steps")
        n = sum(not _is_timing(k) for x in a[method]["metrics"] for k in x)
        print(f"{method}: parameters {'identical' if same_params else 'DIFFERENT'}; "
              f"{n} metric values, {len(diffs)} different")
        for d in diffs:
            print("   ", d)
        differences += len(diffs) + (not same_params)
    return 1 if differences else 0


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    if "compare" in args:
        before, after = args["compare"].split(",")
        return compare(Path(before), Path(after))
    models = Path(args.get("models", "/tmp/check_identical_models"))
    steps = int(args.get("steps", 2))
    if "one" in args:  # the child process: one method, its result into `result=`
        Path(args["result"]).write_text(json.dumps(run_one(args["one"], models, steps)))
        return 0
    out = Path(args["out"])
    results = {}
    for method in args.get("methods", ",".join(METHODS)).split(","):
        print(f"running {method} ({steps} steps)...", flush=True)
        result = out.with_suffix(f".{method}.tmp")
        proc = subprocess.run([sys.executable, __file__, f"one={method}", f"models={models}", f"steps={steps}",
                               f"result={result}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results[method] = json.loads(result.read_text())
        result.unlink()
        out.write_text(json.dumps(results, indent=1))
        print(f"  done: params {results[method]['params_sha256'][:16]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
