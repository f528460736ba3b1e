"""Compare methods by their whole evaluation curves: accuracy against rollout tokens, steps and
training wall time, and the rollout tokens each method needed to reach a target accuracy.

    python -m rl.compare runs=RUN_DIR,RUN_DIR,... [metric=eval/gsm8k/pass@1] [target=ACC]
        [labels=NAME,NAME,...] [out=DIR] [--allow-mixed-protocols]

Each run directory holds `config.yaml` (its `algorithm` names the method, `seed` the seed) and
`metrics.jsonl`, whose lines with the metric key are the evaluation points (rl.evaluate's keys,
logged with `step`, `wall_time` and `cumulative_rollout_tokens`). Runs of one method with
different seeds become a mean curve with a min-max band: matched by step (runs evaluated at
other steps are interpolated linearly), the mean of their tokens, wall times and metric values.

A method's tokens (steps, wall time) to target is where its mean curve first reaches the target,
interpolated linearly between evaluation points. The default target is the best accuracy of the
method whose best is lowest, so every method reaches it. Wall time is the run's clock minus the
time spent evaluating (`eval/time_s`). Written to `out` (default: the current directory):
comparison.md, comparison.json, accuracy_vs_tokens.png, accuracy_vs_step.png,
accuracy_vs_wall_time.png.

Beside the whole curves, a second table reports checkpoints per benchmark: each run's FINAL
evaluation and its BEST evaluation with the step it came from (pass@1, i.e. avg@k), means over
seeds. The OPSD paper reports the best checkpoint per benchmark; that figure picks a checkpoint on
the test set itself, so it is labelled as such and never replaces the whole-curve comparison.

Runs must have been evaluated under one protocol (the `eval` section's prompt format, template,
thinking switch, max_tokens, temperature, top-p/top-k, k, answer fallback and subset, as recorded in
each run's config.yaml): curves evaluated differently are not comparable, so mixed protocols stop
the comparison with the differing settings listed. --allow-mixed-protocols compares them anyway,
with the differences printed as a warning at the top of comparison.md and in comparison.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from rl.cli import UsageError, parse_command_line, require, tool_arguments

AXES = {
    "tokens": "cumulative rollout tokens",
    "step": "training step",
    "wall_time": "training wall time (s, evaluation excluded)",
}


class CompareError(ValueError):
    """The runs cannot be compared as asked; the message says why and what to pass."""


@dataclass
class Run:
    path: Path
    label: str
    seed: int
    x: dict[str, np.ndarray]  # axis name -> position of each evaluation point
    y: np.ndarray  # the metric at each evaluation point
    protocol: dict | None = None  # the evaluation protocol (EvalConfig.protocol_settings); None: unrecorded


def run_protocol(config: dict) -> dict | None:
    """The evaluation protocol a run's config.yaml records; None when it predates protocols."""
    from pydantic import ValidationError

    from rl.config import EvalConfig

    try:
        return EvalConfig.model_validate(config.get("eval") or {}).protocol_settings()
    except ValidationError:
        return None


def protocol_differences(runs: list[Run]) -> list[str]:
    """One line per protocol setting on which the runs disagree (empty when they all agree)."""
    if all(r.protocol == runs[0].protocol for r in runs):
        return []
    if any(r.protocol is None for r in runs):
        unrecorded = [str(r.path) for r in runs if r.protocol is None]
        return [f"no evaluation protocol recorded (an old config.yaml) for {', '.join(unrecorded)}"]
    keys = [k for k in runs[0].protocol if len({json.dumps(r.protocol.get(k)) for r in runs}) > 1]
    return [f"{k}: " + ", ".join(f"{r.label} ({r.path.name}) {r.protocol.get(k)!r}" for r in runs) for k in keys]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise CompareError(f"{run_dir} has no metrics.jsonl: is it a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise CompareError(f"{run_dir} has no config.yaml: is it a run directory?")
    return yaml.safe_load(path.read_text())


def eval_points(lines: list[dict], metric: str) -> dict[str, list[float]]:
    """Axis positions and values of the lines carrying `metric`, one per step (the last wins)."""
    by_step: dict[int, dict[str, float]] = {}
    eval_seconds = 0.0
    for line in lines:
        eval_seconds += line.get("eval/time_s", 0.0)
        if metric in line:
            missing = [k for k in ("step", "wall_time", "cumulative_rollout_tokens") if k not in line]
            if missing:
                raise CompareError(f"An evaluation line with `{metric}` lacks {missing}; the trainer logs them with each evaluation.")
            by_step[line["step"]] = {
                "tokens": line["cumulative_rollout_tokens"],
                "step": line["step"],
                # Every evaluation so far is subtracted, this line's own included: it ran before
                # the line was written.
                "wall_time": line["wall_time"] - eval_seconds,
                "value": line[metric],
            }
    points = [by_step[s] for s in sorted(by_step)]
    return {key: [p[key] for p in points] for key in (*AXES, "value")}


def checkpoint_scores(lines: list[dict]) -> dict[str, dict]:
    """Per benchmark with pass@1 values in a run's metrics lines: the final evaluation's value and
    step, and the best value and its step (the earliest step on a tie)."""
    out: dict[str, dict] = {}
    for line in lines:
        for key, value in line.items():
            if key.startswith("eval/") and key.endswith("/pass@1") and "step" in line:
                bench = key.split("/")[1]
                s = out.setdefault(bench, {"final": value, "final_step": line["step"], "best": value, "best_step": line["step"]})
                s["final"], s["final_step"] = value, line["step"]
                if value > s["best"]:
                    s["best"], s["best_step"] = value, line["step"]
    return out


def checkpoint_table(runs: list[Run]) -> dict[str, dict[str, dict]]:
    """method -> benchmark -> final and best-checkpoint pass@1 (means over the method's seeds), with
    each seed's best step. Only benchmarks every run of the method evaluated."""
    table: dict[str, dict[str, dict]] = {}
    for label, rs in group_runs(runs).items():
        scores = [checkpoint_scores(read_metrics(r.path)) for r in rs]
        for bench in sorted(set.intersection(*(set(s) for s in scores))):
            per = [s[bench] for s in scores]
            table.setdefault(label, {})[bench] = {
                "final": float(np.mean([p["final"] for p in per])),
                "best_checkpoint": float(np.mean([p["best"] for p in per])),
                "best_steps": [p["best_step"] for p in per],
                "final_steps": [p["final_step"] for p in per],
            }
    return table


def load_run(run_dir: str | Path, metric: str, label: str | None = None) -> Run:
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    points = eval_points(read_metrics(run_dir), metric)
    if not points["value"]:
        raise CompareError(f"{run_dir}/metrics.jsonl has no `{metric}` values; evaluation keys there: {eval_keys(run_dir)}.")
    return Run(
        run_dir,
        label or config.get("algorithm", run_dir.name),
        config.get("seed", 0),
        {axis: np.asarray(points[axis], dtype=float) for axis in AXES},
        np.asarray(points["value"], dtype=float),
        run_protocol(config),
    )


def eval_keys(run_dir: Path) -> list[str]:
    return sorted({k for line in read_metrics(run_dir) for k in line if k.startswith("eval/")})


def default_metric(run_dirs: list[Path]) -> str:
    """pass@1 of the benchmark with the most problems that every run evaluated."""
    logged = [{k: v for line in read_metrics(d) for k, v in line.items() if k.startswith("eval/")} for d in run_dirs]
    common = set.intersection(*({k for k in keys if k.endswith("/pass@1")} for keys in logged))
    if not common:
        raise CompareError("No eval/<benchmark>/pass@1 key is logged by every run; pass metric=...")
    return max(sorted(common), key=lambda k: logged[0].get(k.removesuffix("pass@1") + "problems", 0))


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        same_seed = [r for r in groups.get(run.label, []) if r.seed == run.seed]
        if same_seed:
            raise CompareError(
                f"Runs {same_seed[0].path} and {run.path} are both method {run.label!r} with seed {run.seed}; "
                "give labels=NAME,NAME,... to tell the methods apart."
            )
        groups.setdefault(run.label, []).append(run)
    return groups


def seed_mean(runs: list[Run]) -> dict[str, list[float]]:
    """One method's curve: at each evaluated step where every run is defined, the mean over runs
    of tokens, wall time and the metric, and the metric's min and max (the band).

    Runs are matched by step, the one axis all seeds share; a run evaluated at other steps is
    interpolated linearly in between.
    """
    lo, hi = max(r.x["step"][0] for r in runs), min(r.x["step"][-1] for r in runs)
    if lo > hi:
        raise CompareError(f"The runs of {runs[0].label!r} have no evaluated steps in common; they cannot be averaged.")
    grid = np.unique(np.concatenate([r.x["step"][(r.x["step"] >= lo) & (r.x["step"] <= hi)] for r in runs]))
    values = np.stack([np.interp(grid, r.x["step"], r.y) for r in runs])
    curve = {axis: np.mean([np.interp(grid, r.x["step"], r.x[axis]) for r in runs], axis=0).tolist() for axis in AXES}
    return {**curve, "mean": values.mean(0).tolist(), "min": values.min(0).tolist(), "max": values.max(0).tolist()}


def first_crossing(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x where the piecewise-linear curve reaches `target`; None if it never does."""
    if ys[0] >= target:
        return xs[0]
    for i in range(1, len(xs)):
        if ys[i] >= target:
            # Measured back from the point that reaches the target: exactly xs[i] when it equals it.
            return xs[i] - (ys[i] - target) * (xs[i] - xs[i - 1]) / (ys[i] - ys[i - 1])
    return None


def _ratio(value: float | None, best: float | None) -> float | None:
    if value is None or best is None:
        return None
    return value / best if best > 0 else (1.0 if value == 0 else float("inf"))


def compare(runs: list[Run], metric: str, target: float | None = None, allow_mixed_protocols: bool = False) -> dict:
    """Everything comparison.json holds: curves, target, per-method distances to it, ratios.

    Runs evaluated under different protocols raise CompareError, unless allow_mixed_protocols,
    when the differences are returned as `protocol_warning`."""
    differences = protocol_differences(runs)
    if differences and not allow_mixed_protocols:
        raise CompareError(
            "The runs were evaluated under different protocols, so their curves are not comparable: "
            + "; ".join(differences) + ". Evaluate them alike (the same eval.* settings, e.g. "
            "eval.protocol=opsd_paper; rl.evaluate can re-evaluate a run's checkpoints), or pass "
            "--allow-mixed-protocols to compare them anyway with this warning in the report."
        )
    groups = group_runs(runs)
    curves = {label: seed_mean(rs) for label, rs in groups.items()}
    bests = {label: max(c["mean"]) for label, c in curves.items()}
    target_rule = "given with target=" if target is not None else "best accuracy of the method whose best is lowest"
    target = min(bests.values()) if target is None else target
    methods = {}
    for label, rs in groups.items():
        c = curves[label]
        methods[label] = {
            "runs": [str(r.path) for r in rs],
            "seeds": [r.seed for r in rs],
            "best": bests[label],
            "final": c["mean"][-1],
            **{f"{axis}_to_target": first_crossing(c[axis], c["mean"], target) for axis in AXES},
            "per_run_tokens_to_target": [first_crossing(r.x["tokens"].tolist(), r.y.tolist(), target) for r in rs],
            "curve": c,
        }
    reached = {label: m["tokens_to_target"] for label, m in methods.items() if m["tokens_to_target"] is not None}
    best_method = min(reached, key=reached.get) if reached else None
    for m in methods.values():
        m["token_ratio"] = _ratio(m["tokens_to_target"], reached.get(best_method))
    warning = None
    if all(m["tokens_to_target"] == 0 for m in methods.values()):
        # Happens by default when the weakest method never rose above the common start.
        warning = (
            f"Every method starts at or above the target {target:.4f}, so each reaches it at 0 tokens and the "
            "ratios say nothing. Pass target= above the starting accuracy."
        )
    return {"metric": metric, "target": target, "target_rule": target_rule, "best_method": best_method,
            "warning": warning, "protocol": runs[0].protocol if not differences else None,
            "protocol_warning": ("MIXED EVALUATION PROTOCOLS: " + "; ".join(differences)) if differences else None,
            "methods": methods, "checkpoints": checkpoint_table(runs)}


def _fmt(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    lines = [
        f"# Comparison: {result['metric']}",
        "",
        f"Target accuracy {result['target']:.4f} ({result['target_rule']}). Tokens, steps and wall time to "
        "target: where the method's mean curve first reaches the target, interpolated linearly between "
        "evaluations; whole curves, no checkpoint picking. Ratio: tokens to target over those of the "
        f"method that needed fewest ({result['best_method']}).",
        *(["", f"**Warning:** {result['warning']}"] if result["warning"] else []),
        *(["", f"**WARNING, not comparable as evaluated:** {result['protocol_warning']}"] if result.get("protocol_warning") else []),
        "",
        "| method | seeds | best | final | rollout tokens to target | ratio | steps to target | wall time to target (s) | tokens to target per seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in result["methods"].items():
        per_run = ", ".join(_fmt(t, ",.0f") for t in m["per_run_tokens_to_target"])
        lines.append(
            f"| {label} | {', '.join(map(str, m['seeds']))} | {m['best']:.4f} | {m['final']:.4f} | "
            f"{_fmt(m['tokens_to_target'], ',.0f')} | {_fmt(m['token_ratio'], '.2f')} | "
            f"{_fmt(m['step_to_target'], '.1f')} | {_fmt(m['wall_time_to_target'], '.0f')} | {per_run} |"
        )
    lines += checkpoint_markdown(result.get("checkpoints") or {})
    return "\n".join(lines) + "\n"


def checkpoint_markdown(checkpoints: dict) -> list[str]:
    if not checkpoints:
        return []
    lines = [
        "",
        "## Final and best checkpoint per benchmark (pass@1)",
        "",
        "Best checkpoint: the highest evaluation of each run on each benchmark, the step it came from, as the "
        "OPSD paper reports; it picks a checkpoint on the test set itself, so it is optimistic. The whole-curve "
        "comparison above is the one to trust.",
        "",
        "| method | benchmark | final | final step | best checkpoint | best step per seed |",
        "|---|---|---|---|---|---|",
    ]
    for label, benches in checkpoints.items():
        for bench, c in benches.items():
            lines.append(f"| {label} | {bench} | {c['final']:.4f} | {', '.join(map(str, c['final_steps']))} | "
                         f"{c['best_checkpoint']:.4f} | {', '.join(map(str, c['best_steps']))} |")
    return lines


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, axis_label in AXES.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, m in result["methods"].items():
            c = m["curve"]
            seeds = len(m["seeds"])
            name = f"{label} (mean of {seeds} seeds, min-max band)" if seeds > 1 else label
            (line,) = ax.plot(c[axis], c["mean"], marker="o", markersize=3, label=name)
            if seeds > 1:
                ax.fill_between(c[axis], c["min"], c["max"], color=line.get_color(), alpha=0.2, linewidth=0)
            crossing = m[f"{axis}_to_target"]
            if crossing is not None:
                ax.plot([crossing], [result["target"]], marker="x", markersize=9, color=line.get_color())
        ax.axhline(result["target"], color="grey", linestyle="--", linewidth=1, label=f"target {result['target']:.3f}")
        ax.set_xlabel(axis_label)
        ax.set_ylabel(result["metric"])
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_{axis}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


USAGE = __doc__.split("\n\n")[1]


def _target(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        raise UsageError(f"target={value} is not a number: give an accuracy such as target=0.4.") from None


def main(argv: list[str] | None = None) -> int:
    argv = tool_arguments(argv, USAGE)
    if argv is None:
        return 0
    try:
        line = parse_command_line(argv, USAGE, ("runs", "metric", "target", "labels", "out"), ("--allow-mixed-protocols",))
        run_dirs = [Path(r) for r in require(line, "runs", USAGE).split(",")]
        labels = line.options["labels"].split(",") if "labels" in line.options else [None] * len(run_dirs)
        if len(labels) != len(run_dirs):
            raise CompareError(f"labels= has {len(labels)} names for {len(run_dirs)} runs.")
        metric = line.options.get("metric") or default_metric(run_dirs)
        runs = [load_run(d, metric, label) for d, label in zip(run_dirs, labels)]
        result = compare(runs, metric, _target(line.options.get("target")), "--allow-mixed-protocols" in line.switches)
    except (UsageError, CompareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(line.options.get("out", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "comparison.md").write_text(markdown(result))
    pngs = plot(result, out)
    print(markdown(result))
    if result["warning"]:
        print(f"warning: {result['warning']}", file=sys.stderr)
    if result["protocol_warning"]:
        print(f"WARNING: {result['protocol_warning']}", file=sys.stderr)
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {', '.join(p.name for p in pngs)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
