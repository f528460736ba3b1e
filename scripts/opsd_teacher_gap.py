"""Does a model gain from OPSD's privileged context? Greedy accuracy as student and as teacher.

    PYTHONPATH=. python scripts/opsd_teacher_gap.py [recipe=opsd_smollm2] [benchmark=gsm8k] \
        [local_dir=../shared/data] [limit=100] [out=/tmp/teacher_gap.json] [key=value ...]

OPSD's premise is that the model, shown the reference solution, is a better teacher than it is a
student. This script measures that gap before any training: the same problems, the same model
and engine (vLLM), greedy, graded by math-verify, once with the student prompt (`build_prompt`)
and once with the teacher prompt (`build_teacher_prompt`: problem, reference solution,
instruction). A gap near zero means OPSD has nothing to distil; the report also counts teacher
answers that quote the reference markers, a sign the teacher copies instead of solving.
Other key=value pairs are recipe overrides (model.path=..., rollout.max_tokens=...).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OWN_KEYS = ("recipe", "benchmark", "local_dir", "limit", "out")


def main(argv: list[str]) -> dict:
    from transformers import AutoTokenizer

    from rl.config import load_config
    from rl.data import build_prompt, build_teacher_prompt
    from rl.evaluate import _scorer, grade, load_benchmark
    from rl.models import resolve_model_path
    from rollouts.registry import make_engine
    from rl.core.types import SamplingSpec

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments are key=value (recipe=..., limit=..., model.path=...); got {bad}")
    args = dict(a.split("=", 1) for a in argv)
    overrides = [f"{k}={v}" for k, v in args.items() if k not in OWN_KEYS]
    cfg = load_config(args.get("recipe", "opsd_smollm2"), overrides)
    bench, limit = args.get("benchmark", "gsm8k"), int(args.get("limit", 100))
    rows = load_benchmark(bench, args.get("local_dir", "../shared/data"), limit)
    path = resolve_model_path(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = {
        "student": [build_prompt(r, cfg.data, tok) for r in rows],
        "teacher": [build_teacher_prompt(r, cfg.data, tok, cfg.opsd.teacher_template, cfg.opsd.teacher_instruction, cfg.opsd.teacher_enable_thinking)
                    for r in rows],
    }
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=cfg.rollout.max_tokens)
    longest = max(len(p) for ps in prompts.values() for p in ps)
    engine = make_engine(cfg.rollout.engine, path, seed=cfg.seed, dtype=cfg.model.dtype,
                         max_model_len=longest + spec.max_tokens, kv_cache_gb=cfg.rollout.kv_cache_gb)
    report: dict = {"model": str(path), "benchmark": bench, "problems": len(rows), "max_tokens": spec.max_tokens}
    try:
        with _scorer("last_number") as scorer:
            for role, ps in prompts.items():
                start = time.time()
                texts = [g[0].text for g in engine.generate(ps, spec)]
                correct = grade(scorer, texts, rows)
                report[role] = {
                    "accuracy": sum(correct) / len(rows),
                    "correct": sum(correct),
                    "mentions_reference": sum("reference" in t.lower() for t in texts),
                    "seconds": round(time.time() - start, 1),
                    "examples": [{"problem": r["problem"], "answer": r["answer"], "completion": t, "correct": c}
                                 for r, t, c in list(zip(rows, texts, correct))[:5]],
                }
                print(f"{role}: {sum(correct)}/{len(rows)} correct ({report[role]['seconds']} s)", flush=True)
    finally:
        engine.close()
    out = Path(args.get("out", "/tmp/teacher_gap.json"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report in {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
