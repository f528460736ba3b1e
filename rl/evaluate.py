"""Benchmark evaluation: vLLM generation, the `eval` section's own protocol, math-verify grading.

    python -m rl.evaluate model=PATH|RUN_DIR benchmarks=gsm8k,math500 [local_dir=../shared/data]
        [limit=N] [k=8] [temperature=0.6] [top_p=0.95] [max_tokens=1024] [answer_fallback=...]
        [recipe=NAME] [out=DIR] [seed=0] [section.key=value ...]
    python -m rl.evaluate regrade=OUT_DIR|RECORDS.jsonl [answer_fallback=...]

`model` is an HF folder, a hub id, the embedded default, or a run directory (its `final/` model,
and its `config.yaml` for the evaluation protocol unless `recipe` is given). Keys without a dot are
the `eval` section's options (see rl.config.EvalConfig: prompt format, thinking switch, max_tokens,
temperature, k, or a named `protocol=opsd_paper`); dotted keys override any other config value.
The protocol is the `eval` section's alone, never the training recipe's data/rollout settings, so a
run evaluated here and during training is evaluated alike; summary.json records it (`protocol`).
Per-problem records go to `<out>/<benchmark>.jsonl`, the metrics to `<out>/summary.json`.

Metric keys, for each benchmark B (the same in run(), regrade() and the trainer's metrics.jsonl):
  eval/B/pass@1              mean correctness over all samples: greedy accuracy when k=1
  eval/B/pass@J              unbiased pass@J (Chen et al. 2021) from the k samples, J = 2, 4, ..., k
  eval/B/avg@K               mean over problems of the fraction of the K samples that are correct
  eval/B/pass@1_se           the standard error of pass@1 over the problems (sd of per-problem means / sqrt(n))
  eval/B/boxed_rate          share of samples with a non-empty \\boxed{} answer (the format, right or wrong)
  eval/B/response_length     mean completion tokens over all samples
  eval/B/truncated_fraction  samples that hit max_tokens
  eval/B/problems            problems evaluated
  eval/time_s                seconds the whole evaluation took (run() only; rl.compare subtracts it
                             from wall time so that curves show training time)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rl.cli import UsageError, parse_command_line, tool_arguments
from rl.config import EVAL_PROTOCOLS, ConfigError, DataConfig, EvalConfig, RunConfig, load_config
from rl.data import DataError, load_rows, prompt_ids
from rewards.math import ANSWER_FALLBACKS, last_boxed
from rewards.scoring import RewardScorer
from rl.core.types import SamplingSpec

# Split of each benchmark on the hub (the AIME and HMMT sets publish their 30 problems as `train`);
# local copies are all <local_dir>/<name>/test.jsonl.
HUB_SPLITS = {"gsm8k": "test", "math500": "test", "amc23": "test", "aime24": "train", "aime25": "train", "hmmt25": "train"}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a product of ratios (Chen et al. 2021): the binomials themselves overflow floats
    for the sample counts of long evaluations.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def pass_ks(k: int) -> list[int]:
    """The j of the reported pass@j: powers of two below k, and k."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i <= k} | {k})


def sampling_temperature(cfg: EvalConfig) -> float:
    return cfg.resolved_temperature()


def eval_prompt(row: dict, cfg: EvalConfig, tokenizer) -> list[int]:
    """The evaluation prompt of a benchmark row, from the `eval` section only (never `data`)."""
    return prompt_ids(cfg, row["problem"], tokenizer)


def eval_due(cfg: EvalConfig, step: int, total_steps: int) -> bool:
    """Whether the trainer evaluates after `step` (0: before the first step)."""
    if step == 0:
        return cfg.at_start
    return cfg.every_steps > 0 and (step % cfg.every_steps == 0 or step == total_steps)


def load_benchmark(name: str, local_dir: str | None, limit: int | None) -> list[dict]:
    """The first `limit` rows of a benchmark in file order, normalised like training rows."""
    split = "test" if local_dir is not None or name not in HUB_SPLITS else HUB_SPLITS[name]
    cfg = DataConfig(train=name, split=split, local_dir=local_dir, shuffle=False, max_rows=limit)
    try:
        return load_rows(cfg, seed=0)
    except DataError as e:
        raise DataError(
            f"Benchmark {name!r}: {e} For evaluation the folder is `eval.local_dir` (on the "
            "rl.evaluate command line: local_dir=../shared/data)."
        ) from None


def benchmark_metrics(records: list[dict]) -> dict[str, float]:
    """pass@j, avg@k, lengths of one benchmark's records (each with k graded samples)."""
    k = len(records[0]["correct"])
    if any(len(r["correct"]) != k for r in records):
        raise ValueError("records of one benchmark must all have the same number of samples")
    n_problems, n_samples = len(records), len(records) * k
    correct = [sum(r["correct"]) for r in records]
    out: dict[str, float] = {f"pass@{j}": sum(pass_at_k(k, c, j) for c in correct) / n_problems for j in pass_ks(k)}
    out[f"avg@{k}"] = sum(c / k for c in correct) / n_problems
    # The standard error of pass@1 over problems (their per-problem means vary; the sample sd / sqrt(n)).
    means = [c / k for c in correct]
    spread = sum((m - out[f"avg@{k}"]) ** 2 for m in means) / max(n_problems - 1, 1)
    out["pass@1_se"] = (spread / n_problems) ** 0.5
    # What a small model learns first: answering in the graded format at all (a non-empty \boxed{}).
    out["boxed_rate"] = sum(bool((last_boxed(c) or "").strip()) for r in records for c in r["completions"]) / n_samples
    out["response_length"] = sum(t for r in records for t in r["response_tokens"]) / n_samples
    out["truncated_fraction"] = sum(f == "length" for r in records for f in r["finish_reasons"]) / n_samples
    out["problems"] = n_problems
    return out


def metrics_by_benchmark(records: list[dict]) -> dict[str, float]:
    """`eval/<benchmark>/<metric>` for records of any mix of benchmarks."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["benchmark"], []).append(r)
    return {f"eval/{b}/{key}": v for b, rs in groups.items() for key, v in benchmark_metrics(rs).items()}


def grade(scorer: RewardScorer, completions: list[str], rows: list[dict]) -> list[bool]:
    """Whether each completion is right: full marks from the grader (the scorer's correctness reward)."""
    return scorer.score(completions, rows).correct


def _scorer(answer_fallback: str, grader: str = "math_verify") -> RewardScorer:
    # Inline: math-verify's own signal timeouts bound each check, and no worker processes are
    # started next to the trainer's.
    return RewardScorer([(grader, 1.0)], workers=0, settings={"answer_fallback": answer_fallback}, correctness=0)


def read_records(path: str | Path) -> list[dict]:
    """Records from one `<benchmark>.jsonl` file or every such file in an output directory."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"No evaluation records at {path} (expected <benchmark>.jsonl files).")
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def regrade(path: str | Path, answer_fallback: str | None = None) -> dict[str, float]:
    """Grade saved generations again; the same keys as Evaluator.run() without eval/time_s.

    `answer_fallback` None uses the setting each record was graded with.
    """
    if answer_fallback is not None and answer_fallback not in ANSWER_FALLBACKS:
        raise ConfigError(f"answer_fallback must be one of {ANSWER_FALLBACKS}, got {answer_fallback!r}.")
    records = read_records(path)
    scorers: dict[str, RewardScorer] = {}
    regraded = []
    try:
        for r in records:
            # Records before eval.grader existed were graded with math_verify.
            key = (answer_fallback or r["answer_fallback"], r.get("grader", "math_verify"))
            if key not in scorers:
                scorers[key] = _scorer(*key)
            row = {"problem": r["problem"], "answer": r["answer"]}
            regraded.append({**r, "correct": grade(scorers[key], r["completions"], [row] * len(r["completions"]))})
    finally:
        for scorer in scorers.values():
            scorer.close()
    return metrics_by_benchmark(regraded)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _Progress:
    """One stderr line per batch: problems done, running accuracy, rate and ETA."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def update(self, benchmark: str, records: list[dict], n_rows: int, problems: int) -> None:
        self.done += problems
        elapsed = time.time() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        accuracy = sum(sum(r["correct"]) / len(r["correct"]) for r in records) / len(records)
        print(
            f"[eval] {benchmark} {len(records)}/{n_rows} | all {self.done}/{self.total} problems | "
            f"pass@1 so far {accuracy:.3f} | {rate:.2f} problems/s | ETA {_duration((self.total - self.done) / rate)}",
            file=sys.stderr,
            flush=True,
        )


class Evaluator:
    """Benchmarks loaded and prompts built once; run(engine) evaluates the engine's current weights.

    `engine` is anything with the engines' generate(prompts, SamplingSpec): a RolloutEngine or a
    rollouts.pool.RolloutPool, so the trainer evaluates with its own engines after a weight sync.
    """

    def __init__(self, tokenizer, eval_cfg: EvalConfig):
        self.cfg = eval_cfg
        self.spec = SamplingSpec(
            n=eval_cfg.k,
            temperature=sampling_temperature(eval_cfg),
            top_p=eval_cfg.top_p,
            top_k=eval_cfg.top_k,
            max_tokens=eval_cfg.max_tokens,
        )
        self.rows = {b: load_benchmark(b, eval_cfg.local_dir, eval_cfg.limit) for b in eval_cfg.benchmarks}
        self.prompts = {b: [eval_prompt(r, eval_cfg, tokenizer) for r in rows] for b, rows in self.rows.items()}
        self._check_prompt_lengths(eval_cfg.max_prompt_tokens)
        self.longest_prompt = max(len(p) for prompts in self.prompts.values() for p in prompts)

    def context_tokens(self) -> int:
        """Engine context an evaluation needs: the longest prompt plus max_tokens."""
        return self.longest_prompt + self.spec.max_tokens

    def _check_prompt_lengths(self, limit: int) -> None:
        # The engines' context is sized as max_prompt_tokens + max_tokens: a longer prompt would
        # fail inside vLLM half-way through an evaluation.
        for bench, prompts in self.prompts.items():
            longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            if len(prompts[longest]) > limit:
                raise DataError(
                    f"Benchmark {bench!r} row {longest} has a {len(prompts[longest])}-token prompt, over "
                    f"eval.max_prompt_tokens={limit}; raise eval.max_prompt_tokens."
                )

    def settings(self) -> dict:
        return {**self.cfg.model_dump(mode="json"), "temperature": self.spec.temperature, "max_tokens": self.spec.max_tokens}

    def protocol(self) -> dict:
        return self.cfg.protocol_settings()

    def run(self, engine, out_dir: str | Path | None = None, meta: dict | None = None) -> dict[str, float]:
        """Metrics (see the module docstring); with `out_dir`, summary.json and (eval.save_records)
        the per-problem records written there."""
        start = time.time()
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        progress = _Progress(sum(len(rows) for rows in self.rows.values()))
        metrics: dict[str, float] = {}
        for bench in self.rows:
            with _scorer(self.cfg.answer_fallback, self.cfg.grader_for(bench)) as scorer:
                records = self._run_benchmark(engine, scorer, bench, progress, out)
            metrics.update(metrics_by_benchmark(records))
        metrics["eval/time_s"] = time.time() - start
        if out is not None:
            summary = {**(meta or {}), "protocol": self.protocol(), "settings": self.settings(), "metrics": metrics}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return metrics

    def _run_benchmark(self, engine, scorer, bench: str, progress: _Progress, out: Path | None) -> list[dict]:
        rows, prompts, size = self.rows[bench], self.prompts[bench], self.cfg.batch_size
        out = out if self.cfg.save_records else None
        records: list[dict] = []
        if out is not None:
            (out / f"{bench}.jsonl").write_text("")
        for lo in range(0, len(rows), size):
            batch = self._generate_and_grade(engine, scorer, bench, rows[lo : lo + size], prompts[lo : lo + size], lo)
            records += batch
            if out is not None:  # appended per batch: a long evaluation that dies keeps what it did
                with (out / f"{bench}.jsonl").open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in batch)
            progress.update(bench, records, len(rows), len(batch))
        return records

    def _generate_and_grade(self, engine, scorer, bench, rows, prompts, first_index) -> list[dict]:
        groups = engine.generate(prompts, self.spec)
        texts = [c.text for group in groups for c in group]
        correct = grade(scorer, texts, [row for row, group in zip(rows, groups) for _ in group])
        records, pos = [], 0
        for i, (row, group) in enumerate(zip(rows, groups)):
            records.append({
                "benchmark": bench,
                "index": first_index + i,
                "problem": row["problem"],
                "answer": row["answer"],
                "answer_fallback": self.cfg.answer_fallback,
                "grader": self.cfg.grader_for(bench),
                "completions": [c.text for c in group],
                "response_tokens": [len(c.token_ids) for c in group],
                "finish_reasons": [c.finish_reason for c in group],
                "correct": correct[pos : pos + len(group)],
            })
            pos += len(group)
        return records


# ---------------------------------------------------------------------------------------------
# Command line.

USAGE = __doc__.split("\n\n")[1]
CLI_KEYS = ("model", "recipe", "out", "regrade")


def parse_args(argv: list[str]) -> dict[str, str]:
    """The options by key: rl.evaluate's own, the `eval` section's (without `eval.`), and config
    overrides (dotted keys, or top-level ones such as seed or plugins)."""
    line = parse_command_line(
        argv, USAGE, CLI_KEYS + tuple(EvalConfig.model_fields),
        config_override=lambda key: "." in key or key in RunConfig.model_fields,
    )
    return {**line.options, **dict(override.split("=", 1) for override in line.overrides)}


def _overrides(args: dict[str, str]) -> list[str]:
    out = []
    if args.get("protocol") in EVAL_PROTOCOLS:
        # A protocol named here replaces the one the run's config.yaml spells out key by key; keys
        # also given here still win.
        preset = EVAL_PROTOCOLS[args["protocol"]]
        out += [f"eval.{k}={json.dumps(v)}" for k, v in preset.items() if k not in args]
    for key, value in args.items():
        if key in CLI_KEYS:
            continue
        if key == "benchmarks" and not value.startswith("["):
            value = f"[{value}]"
        out.append(f"eval.{key}={value}" if key in EvalConfig.model_fields else f"{key}={value}")
    return out


def resolve_run(args: dict[str, str]) -> tuple[RunConfig, str, Path]:
    """The config (recipe, else the run's own config.yaml, else defaults, then overrides), the
    model to evaluate, and the output directory."""
    model = args.get("model", "smollm2-135m-instruct")
    run_dir = Path(model) if (Path(model) / "config.yaml").exists() else None
    if run_dir is not None:
        if not (run_dir / "final" / "config.json").exists():
            raise ConfigError(f"Run directory {run_dir} has no final/ model (did training finish with train.save_final?).")
        model = str(run_dir / "final")
    base = args.get("recipe") or (str(run_dir / "config.yaml") if run_dir is not None else None)
    cfg = load_config(base, _overrides(args))
    cfg.model.path = model
    default_out = run_dir / "eval" / "final" if run_dir else Path("eval_results") / f"{Path(model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg, model, Path(args.get("out", default_out))


def format_table(metrics: dict[str, float]) -> str:
    benches = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2})
    lines = []
    for b in benches:
        parts = [f"{k.split('/')[2]} {v:.4g}" for k, v in metrics.items() if k.startswith(f"eval/{b}/")]
        lines.append(f"{b}: " + ", ".join(parts))
    return "\n".join(lines)


def evaluate_model(args: dict[str, str]) -> dict[str, float]:
    from transformers import AutoTokenizer

    from rl.models import resolve_model_path
    from rollouts.registry import make_engine

    cfg, model, out = resolve_run(args)
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    evaluator = Evaluator(tokenizer, cfg.eval)
    settings = cfg.rollout.engine_settings(cfg.model, max_model_len=evaluator.context_tokens())
    engine = make_engine(cfg.rollout.engine, path, seed=cfg.seed, settings=settings)
    try:
        metrics = evaluator.run(engine, out, meta={"model": path})
    finally:
        engine.close()
    print(f"records and summary.json in {out}", file=sys.stderr)
    run_dir = Path(args.get("model", "")) if (Path(args.get("model", "")) / "metrics.jsonl").exists() else None
    if run_dir is not None:
        report_checkpoints(run_dir)
    return metrics


def report_checkpoints(run_dir: Path) -> None:
    """A run evaluated during training: its final and best evaluation per benchmark, with the step
    of the best (the OPSD paper reports the best checkpoint per benchmark; the label says so)."""
    from rl.compare import checkpoint_scores, read_metrics

    for bench, s in checkpoint_scores(read_metrics(run_dir)).items():
        print(f"{bench} during training: final (step {s['final_step']}) pass@1 {s['final']:.4f}; best checkpoint "
              f"(step {s['best_step']}, picked on this test set) {s['best']:.4f}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = tool_arguments(argv, USAGE)
    if argv is None:
        return 0
    from rl.models import ModelError

    try:
        args = parse_args(argv)
        if "regrade" in args:
            metrics = regrade(args["regrade"], args.get("answer_fallback"))
        else:
            metrics = evaluate_model(args)
    except (UsageError, ConfigError, DataError, ModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics), file=sys.stderr)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
