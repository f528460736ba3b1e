"""Check a reward on real data before training with it.

    python -m rewards.check refs=REF[,REF...] data=gsm8k split=test local_dir=../shared/data

Scores each row's reference solution against the row's own gold answer (a correctness reward
should give its maximum) and against another row with a different gold answer (it should give
its minimum), through the same worker pool and timeout as training, then prints the score
distributions, the throughput and every timeout or error. Exit code 1 if any call failed.
"""
from __future__ import annotations

import collections
import re
import sys
import time

from rewards.registry import get_reward
from rewards.scoring import RewardScorer, ScoreResult, shorten

_WORD = re.compile(r"\w+|[^\w\s]")


def reference_pairs(raw_rows: list[dict], question_key: str | None = None) -> tuple[list[dict], list[str]]:
    """Normalised rows that have a reference solution, and that solution as a completion.

    A GSM8K solution is the raw worked solution ending in `#### N` (the form a model imitating
    it writes); a MATH-style one is the `solution` column, ending in \\boxed{}.
    """
    from rl.data import normalize_row

    rows, references = [], []
    for i, raw in enumerate(raw_rows):
        row = normalize_row(raw, i, question_key)
        answer_text = raw.get("answer")
        if isinstance(answer_text, str) and "####" in answer_text:
            references.append(answer_text)
        elif isinstance(row.get("solution"), str) and row["solution"].strip():
            references.append(row["solution"])
        else:
            continue
        rows.append(row)
    return rows, references


def wrong_partner(rows: list[dict], i: int) -> int | None:
    """The next row (cyclically) whose gold answer differs from row i's as a string."""
    n = len(rows)
    for step in range(1, n):
        j = (i + step) % n
        if rows[j]["answer"].strip() != rows[i]["answer"].strip():
            return j
    return None


def _info(texts: list[str], tokenizer, max_tokens: int) -> list[dict]:
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer else len(_WORD.findall(t)) for t in texts]
    return [{"completion_tokens": c, "truncated": c >= max_tokens} for c in counts]


def _distribution(values: list[float]) -> str:
    counts = collections.Counter(round(v, 4) for v in values)
    if len(counts) <= 8:
        return ", ".join(f"{v:g}: {c}" for v, c in sorted(counts.items()))
    s = sorted(values)
    q = [s[int(p * (len(s) - 1))] for p in (0, 0.25, 0.5, 0.75, 1)]
    return "min {:g} | q25 {:g} | median {:g} | q75 {:g} | max {:g}".format(*q)


def run_check(scorer: RewardScorer, rows: list[dict], references: list[str], tokenizer=None, max_tokens: int = 256) -> dict:
    """Score references against their own rows and against a partner row; return both results."""
    pairs = [(i, j) for i in range(len(rows)) if (j := wrong_partner(rows, i)) is not None]
    sets = {
        "reference": ([references[i] for i in range(len(rows))], rows),
        "wrong": ([references[i] for i, _ in pairs], [rows[j] for _, j in pairs]),
    }
    out = {}
    for label, (texts, set_rows) in sets.items():
        start = time.perf_counter()
        result = scorer.score(texts, set_rows, _info(texts, tokenizer, max_tokens))
        out[label] = {"result": result, "seconds": time.perf_counter() - start, "texts": texts, "rows": set_rows}
    return out


def _report_set(label: str, entry: dict, expected: float | None, show: int) -> None:
    result: ScoreResult = entry["result"]
    n = len(result.totals)
    print(f"\n{label}: {n} completions, {n / max(entry['seconds'], 1e-9):.1f}/s ({entry['seconds']:.2f} s)")
    print(f"  total: {_distribution(result.totals)}")
    for part, values in result.parts.items():
        print(f"  {part}: {_distribution(values)}")
    if expected is not None:
        off = [i for i, v in enumerate(result.totals) if v != expected]
        print(f"  not at {expected:g}: {len(off)}")
        for i in off[:show]:
            print(f"    #{i} total {result.totals[i]:g}, gold {entry['rows'][i]['answer']!r}: {shorten(entry['texts'][i], 160)!r}")
    for f in result.failures[:show]:
        print(f"  {f.kind} in {f.reward} on #{f.index}: {shorten(f.message, 200)!r}\n    completion: {shorten(f.completion, 160)!r}")
    if result.failures:
        print(f"  failures: {result.counts}")


USAGE = """usage: python -m rewards.check refs=REF[,REF...] [key=value ...]

  refs             reward names, module:function or file.py:function (summed)
  data             gsm8k, math500, a hub id or a .jsonl path (default gsm8k)
  split            default test
  local_dir        folder with <name>/<split>.jsonl, e.g. ../shared/data
  question_key     the question column, when it is not found by name
  limit            only the first N rows
  workers          worker processes (0: inline; default 2)
  timeout_s        per call (default 10)
  answer_fallback  none, last_number (default) or math_verify
  max_tokens       rollout.max_tokens, for length rewards (default 256)
  tokenizer        count completion_tokens with this tokenizer (else words)
  expect           REF,WRONG: the expected totals for references and wrong answers (e.g. 1,0); list those that differ
  show             examples printed per problem kind (default 5)"""
DEFAULTS = dict(data="gsm8k", split="test", local_dir=None, question_key=None, limit=None, workers="2",
                timeout_s="10", answer_fallback="last_number", max_tokens="256", tokenizer=None, expect=None, show="5")


def _arguments(argv: list[str] | None):
    """The command line in the tools' one style (rl/cli.py): key=value options."""
    from types import SimpleNamespace

    from rl.cli import UsageError, parse_command_line, require, tool_arguments

    argv = tool_arguments(argv, USAGE)
    if argv is None:
        return None
    line = parse_command_line(argv, USAGE, ["refs", *DEFAULTS])
    opts = {**DEFAULTS, **line.options}
    try:
        args = SimpleNamespace(
            refs=require(line, "refs", USAGE).split(","), data=opts["data"], split=opts["split"],
            local_dir=opts["local_dir"], question_key=opts["question_key"],
            limit=None if opts["limit"] is None else int(opts["limit"]), workers=int(opts["workers"]),
            timeout_s=float(opts["timeout_s"]), answer_fallback=opts["answer_fallback"],
            max_tokens=int(opts["max_tokens"]), tokenizer=opts["tokenizer"], show=int(opts["show"]),
            expect=None if opts["expect"] is None else [float(x) for x in opts["expect"].split(",")],
        )
    except ValueError as e:
        raise UsageError(f"A number option has a value that is not a number: {e}.\n{USAGE}") from None
    if args.answer_fallback not in ("none", "last_number", "math_verify"):
        raise UsageError(f"answer_fallback={args.answer_fallback}: choose none, last_number or math_verify.\n{USAGE}")
    if args.expect is not None and len(args.expect) != 2:
        raise UsageError(f"expect={opts['expect']}: give two numbers, REF,WRONG.\n{USAGE}")
    return args


def main(argv: list[str] | None = None) -> int:
    from rl.cli import UsageError

    try:
        args = _arguments(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args is None:
        return 0

    from rl.data import DataError, read_source

    try:
        for ref in args.refs:
            get_reward(ref)
        raw = read_source(args.data, args.split, args.local_dir)[: args.limit]
        rows, references = reference_pairs(raw, args.question_key)
    except (DataError, KeyError, ImportError, AttributeError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no row of {args.data}/{args.split} has a reference solution to score", file=sys.stderr)
        return 2
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    settings = {"answer_fallback": args.answer_fallback, "max_tokens": args.max_tokens}
    start = time.perf_counter()
    with RewardScorer([(r, 1.0) for r in args.refs], args.workers, args.timeout_s, "zero", settings) as scorer:
        scorer.score(references[:1], rows[:1], _info(references[:1], tokenizer, args.max_tokens))  # start workers
        print(f"{len(rows)} rows with reference solutions ({len(raw) - len(rows)} without); workers {args.workers} "
              f"(started in {time.perf_counter() - start:.2f} s), timeout {args.timeout_s:g} s")
        report = run_check(scorer, rows, references, tokenizer, args.max_tokens)
    expected = args.expect or (None, None)
    for (label, entry), want in zip(report.items(), expected):
        _report_set(label, entry, want, args.show)
    print(f"\nwall time {time.perf_counter() - start:.2f} s" + ("" if tokenizer else "; completion_tokens counted as words"))
    return 1 if any(entry["result"].failures for entry in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
