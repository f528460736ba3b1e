"""Check a reward on real data before training with it.

    python -m rewards.check REF [REF ...] --data gsm8k --split test --local-dir ../shared/data

Scores each row's reference solution against the row's own gold answer (a correctness reward
should give its maximum) and against another row with a different gold answer (it should give
its minimum), through the same worker pool and timeout as training, then prints the score
distributions, the throughput and every timeout or error. Exit code 1 if any call failed.
"""
from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("refs", nargs="+", help="reward names, module:function or file.py:function (summed)")
    parser.add_argument("--data", default="gsm8k", help="gsm8k, math500, a hub id or a .jsonl path")
    parser.add_argument("--split", default="test")
    parser.add_argument("--local-dir", default=None, help="folder with <name>/<split>.jsonl, e.g. ../shared/data")
    parser.add_argument("--question-key", default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0: inline)")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--answer-fallback", default="last_number", choices=["none", "last_number", "math_verify"])
    parser.add_argument("--max-tokens", type=int, default=256, help="rollout.max_tokens, for length rewards")
    parser.add_argument("--tokenizer", default=None, help="count completion_tokens with this tokenizer (else words)")
    parser.add_argument("--expect", nargs=2, type=float, default=None, metavar=("REF", "WRONG"),
                        help="expected total for references and wrong answers (e.g. 1 0); list those that differ")
    parser.add_argument("--show", type=int, default=5, help="examples printed per problem kind")
    args = parser.parse_args(argv)

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
