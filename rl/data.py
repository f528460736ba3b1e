"""Datasets: load rows, normalise their columns once, build prompts, stream them in a fixed order.

Every row leaves `load_rows` with `problem` (the question text), `answer` (the gold final answer,
extracted once here: GSM8K's `#### N`, MATH's `answer` column or the last \\boxed{} of its
solution) and, when the set has one, `solution` (the reference reasoning; OPSD's privileged
context). Other columns pass through untouched, so custom rewards can read them.

`cfg` is the `data` section (rl.config.DataConfig), `spec` a prompt spec (rl.config.PromptSpec: the
`data` or the `eval` section); this layer reads them and imports neither.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

from rl.core.paths import relative_root
from rewards.math import gsm8k_gold, last_boxed

# Short names -> (hub id, hub config). Local copies live at <local_dir>/<name>/<split>.jsonl.
HUB_NAMES = {
    "gsm8k": ("openai/gsm8k", "main"),
    "math500": ("HuggingFaceH4/MATH-500", None),
    "amc23": ("math-ai/amc23", None),
    "aime24": ("HuggingFaceH4/aime_2024", None),
    # The OPSD paper's other two benchmarks, as its evaluation loads them (siyan-zhao/OPSD
    # eval/evaluate_math.py:237-242 at 7448751): fields `problem` and `answer` (an integer).
    "aime25": ("yentinglin/aime_2025", None),
    "hmmt25": ("MathArena/hmmt_feb_2025", None),
}
QUESTION_KEYS = ("question", "problem", "prompt")
# MetaMathQA's responses (IGPO's training data) end with "The answer is: N"; the answer is the text
# after the LAST such phrase, as IGPO's release reads it (`response.split("The answer is:")[-1]`).
STATED_ANSWER = re.compile(r"The answer is:?")
# GSM8K's calculator annotations inside worked solutions: `<<48/2=24>>`.
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
# `prefix:name` (e.g. `synthetic:chain_addition`): a source served by a registered loader. A
# prefix is one word; hub ids have no colon, and a `.jsonl` source is always read as a file.
PREFIX = r"[A-Za-z_][\w-]*"
SOURCE_PREFIX = re.compile(rf"({PREFIX}):(.+)")
# Registered data sources: prefix -> loader(name, split) -> raw rows. Nothing is built in: plug-in
# modules named in the config's `plugins` register theirs (rl.demo.tiny registers `synthetic`), so
# that demo and test data never sit on the library's import path.
DATA_SOURCES: dict[str, Callable[[str, str], list[dict]]] = {}


class DataError(ValueError):
    """A data source cannot be read or a row lacks what training needs."""


class MissingAnswerError(DataError):
    """A row has no gold final answer."""


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (relative_root() / p)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({e}). Fix or remove that line.") from None
    return rows


def _read_hub(name: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(
            f"Could not load dataset {name!r} (split {split!r}) from the hub: {type(e).__name__}: {e}. "
            "If this machine is offline, point `data.local_dir` at a folder holding "
            "<name>/<split>.jsonl (e.g. ../shared/data) or set `data.train` to a .jsonl path."
        ) from None
    return [dict(r) for r in ds]


def register_data_source(prefix: str, loader: Callable[[str, str], list[dict]]) -> None:
    """Make `data.train=<prefix>:<name>` (and `eval.benchmarks`) read loader(name, split)."""
    if not re.fullmatch(PREFIX, prefix):
        raise ValueError(f"A data source prefix is one word (letters, digits, _ or -), got {prefix!r}.")
    old = DATA_SOURCES.get(prefix)
    if old is not None and old is not loader:
        raise ValueError(f"A data source {prefix!r} is already registered ({old.__module__}.{old.__qualname__}).")
    DATA_SOURCES[prefix] = loader


def source_loader(source: str) -> tuple[Callable[[str, str], list[dict]], str] | None:
    """(loader, name) for a registered `prefix:name` source; None for a file or hub name; a
    DataError naming the fix for a prefix nobody registered."""
    match = SOURCE_PREFIX.fullmatch(source)
    if match is None or source.endswith(".jsonl"):
        return None
    prefix, name = match.groups()
    if prefix not in DATA_SOURCES:
        raise DataError(
            f"Data source {source!r}: no data source {prefix!r} is registered (registered: "
            f"{', '.join(sorted(DATA_SOURCES)) or 'none'}). The module that provides it registers it with "
            "rl.data.register_data_source; name that module in the config's `plugins` (e.g. "
            "plugins=[rl.demo.tiny] for synthetic:<task>, the offline demo tasks)."
        )
    return DATA_SOURCES[prefix], name


_ANNOUNCED: set[Path] = set()  # local copies found missing, said once per process


def read_source(source: str, split: str, local_dir: str | None) -> list[dict]:
    registered = source_loader(source)
    if registered is not None:
        loader, name = registered
        return loader(name, split)
    if source.endswith(".jsonl"):
        path = _resolve(source)
        if not path.exists():
            raise DataError(f"Data file {path} does not exist. Check `data.train` (paths are relative to {relative_root()}).")
        return _read_jsonl(path)
    hub_name, hub_config = HUB_NAMES.get(source, (source, None))
    if local_dir is not None and source in HUB_NAMES:
        path = _resolve(local_dir) / source / f"{split}.jsonl"
        if path.exists():
            return _read_jsonl(path)
        if path not in _ANNOUNCED:
            _ANNOUNCED.add(path)
            print(f"[data] no local copy at {path} (data.local_dir={local_dir!r}): loading {hub_name} from the hub", flush=True)
        try:
            return _read_hub(hub_name, hub_config, split)
        except DataError as e:
            raise DataError(
                f"{source} ({split}) is neither in `data.local_dir` ({path} does not exist) nor loadable from "
                f"the hub ({e}). Fix `data.local_dir` to a folder holding {source}/{split}.jsonl, or give the "
                "machine access to the hub."
            ) from None
    return _read_hub(hub_name, hub_config, split)


def stated_answer(solution: str) -> str | None:
    """The text after the last "The answer is" (colon optional), stripped; None if absent or empty."""
    matches = list(STATED_ANSWER.finditer(solution))
    return (solution[matches[-1].end():].strip() or None) if matches else None


def strip_calculator_annotations(solution: str) -> str:
    """GSM8K's worked solution without its `<<a*b=c>>` calculator annotations."""
    return CALCULATOR_ANNOTATION.sub("", solution)


def filter_rows(raw: list[dict], cfg) -> list[dict]:
    """data.type_filter, then data.dedupe_by (first row of each value, in file order)."""
    rows = raw
    if cfg.type_filter is not None:
        rows = [r for r in rows if r.get("type") in cfg.type_filter]
    if cfg.dedupe_by is not None:
        seen, unique = set(), []
        for r in rows:
            if cfg.dedupe_by not in r:
                raise DataError(f"data.dedupe_by={cfg.dedupe_by!r}, but a row has no such column (columns: {sorted(r)}).")
            if r[cfg.dedupe_by] not in seen:
                seen.add(r[cfg.dedupe_by])
                unique.append(r)
        rows = unique
    if len(rows) < len(raw):
        print(f"[data] kept {len(rows)} of {len(raw)} rows (data.type_filter / data.dedupe_by)", flush=True)
    return rows


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) forbids the hub, as huggingface_hub reads it."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def local_train_file(cfg) -> Path | None:
    """The local file the training rows will be read from: data.train's .jsonl, or the local copy
    <data.local_dir>/<name>/<split>.jsonl when it exists; None for the hub or a registered source."""
    if source_loader(cfg.train) is not None:
        return None
    if cfg.train.endswith(".jsonl"):
        return _resolve(cfg.train)
    if cfg.local_dir is not None and cfg.train in HUB_NAMES:
        path = _resolve(cfg.local_dir) / cfg.train / f"{cfg.split}.jsonl"
        return path if path.is_file() else None
    return None


def check_local_data(cfg, seed: int) -> str | None:
    """The dry run's data check: read a local training set as the run will (every line parsed, every
    row given its question and gold answer, the filters applied); a DataError names the first
    problem, and a set that yields no row is one. Returns what was checked; None when the rows come
    from the hub or a registered source, which a dry run does not read."""
    path = local_train_file(cfg)
    if path is None:
        return None
    rows = load_rows(cfg, seed)
    if not rows:
        raise DataError(
            f"The training set {path} yields no rows: the file has no data lines, or data.type_filter / "
            "data.dedupe_by / data.max_rows / data.skip_rows_without_answer left none. Point data.train "
            "(or data.local_dir) at a file with one JSON object a line, or loosen those options."
        )
    return f"data: {len(rows)} training rows read from {path} and checked"


def check_local_paths(cfg) -> list[str]:
    """Without reading anything: raise DataError for a data file that does not exist, or for a
    missing local copy while HF_HUB_OFFLINE forbids the hub; return notes (a missing local copy that
    the hub will replace) for the dry run to print."""
    if source_loader(cfg.train) is not None:  # raises for a prefix nobody registered
        return []
    if cfg.train.endswith(".jsonl"):
        path = _resolve(cfg.train)
        if not path.is_file():
            raise DataError(f"Data file {path} does not exist. Check `data.train` (paths are relative to {relative_root()}).")
        return []
    if cfg.local_dir is None or cfg.train not in HUB_NAMES:
        return []
    root = _resolve(cfg.local_dir)
    if not root.is_dir():
        note = f"data.local_dir {root} does not exist"
    elif not (root / cfg.train / f"{cfg.split}.jsonl").is_file():
        note = f"{root / cfg.train / f'{cfg.split}.jsonl'} does not exist"
    else:
        return []
    if hub_offline():
        raise DataError(
            f"{note}, and HF_HUB_OFFLINE is set, so {cfg.train} cannot be loaded from the hub "
            f"({HUB_NAMES[cfg.train][0]}) instead. Set data.local_dir to a folder holding "
            f"{cfg.train}/{cfg.split}.jsonl (paths are relative to {relative_root()}), or unset HF_HUB_OFFLINE "
            "to download it."
        )
    return [f"{note}: {cfg.train} will be loaded from the hub ({HUB_NAMES[cfg.train][0]}); fix data.local_dir if that is not meant."]


def check_prompts_fit(rows: list[dict], cfg, tokenizer, sample: int = 200) -> None:
    """Raise DataError if none of the first `sample` rows' prompts fits data.max_prompt_tokens."""
    lengths = [len(build_prompt(row, cfg, tokenizer)) for row in rows[:sample]]
    if lengths and min(lengths) > cfg.max_prompt_tokens:
        raise DataError(
            f"data.max_prompt_tokens={cfg.max_prompt_tokens} is smaller than every prompt: the first {len(lengths)} "
            f"prompts are {min(lengths)} to {max(lengths)} tokens long (chat template and instruction included). "
            f"Raise data.max_prompt_tokens to at least {min(lengths)} (more, to keep most prompts)."
        )


def normalize_row(
    row: dict, index: int, question_key: str | None = None, solution_key: str | None = None, strip_annotations: bool = True,
    answer_key: str | None = None,
) -> dict:
    """Add `problem`, `answer` (gold) and `solution` (when present); raise if no gold answer.
    strip_annotations removes GSM8K calculator annotations from `solution`; answer_key names the
    column whose value is the gold answer as it is."""
    if answer_key is not None:
        if answer_key not in row:
            raise DataError(f"Row {index} has no `{answer_key}` column (data.answer_key); its columns are {sorted(row)}.")
        row = {**row, "answer": "" if row[answer_key] is None else str(row[answer_key]).strip()}
    if solution_key is not None:
        if solution_key not in row:
            raise DataError(f"Row {index} has no `{solution_key}` column (data.solution_key); its columns are {sorted(row)}.")
        row = {**row, "solution": row[solution_key]}
    out = dict(row)
    key = question_key or next((k for k in QUESTION_KEYS if k in row), None)
    if key is None or key not in row:
        raise DataError(
            f"Row {index} has no question column (looked for {question_key or QUESTION_KEYS}); "
            f"its columns are {sorted(row)}. Set `data.question_key`."
        )
    out["problem"] = row[key]
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:  # GSM8K: worked solution ending in #### N
        out["solution"] = answer.split("####")[0].strip()
        answer = gsm8k_gold(answer)
    if answer in (None, "") and isinstance(row.get("solution"), str):
        answer = last_boxed(row["solution"])
        if answer is None:
            answer = stated_answer(row["solution"])
    if strip_annotations and isinstance(out.get("solution"), str):
        out["solution"] = strip_calculator_annotations(out["solution"])
    if answer in (None, ""):
        raise MissingAnswerError(
            f"Row {index} has no gold answer: no `answer` column, no `#### N` line and no \\boxed{{}} "
            f"in `solution` (columns: {sorted(row)}). Fix the data, drop the row, "
            "or set data.skip_rows_without_answer=true."
        )
    out["answer"] = str(answer)
    return out


def load_rows(cfg, seed: int, split: str | None = None) -> list[dict]:
    raw = filter_rows(read_source(cfg.train, split or cfg.split, cfg.local_dir), cfg)
    rows = []
    for i, r in enumerate(raw):
        try:
            rows.append(normalize_row(r, i, cfg.question_key, cfg.solution_key, cfg.strip_calculator_annotations,
                                      cfg.answer_key))
        except MissingAnswerError:
            if not cfg.skip_rows_without_answer:
                raise
    if len(rows) < len(raw):
        print(f"[data] skipped {len(raw) - len(rows)} of {len(raw)} rows without a gold answer", flush=True)
    if cfg.shuffle:
        random.Random(seed).shuffle(rows)
    return rows[: cfg.max_rows] if cfg.max_rows else rows


def chat_prompt_ids(tokenizer, content: str, system_prompt: str | None, enable_thinking: bool | None,
                    assistant_prefix: str = "") -> list[int]:
    """The chat prompt's token ids; `assistant_prefix` (d1's evaluation prefills "<reasoning>") is
    appended to the templated text after the generation prompt, and the whole text tokenised
    without adding special tokens again (the template has them)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    if assistant_prefix:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        return list(tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    # transformers 5 may return a BatchEncoding-like mapping here.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids(spec, problem: str, tokenizer, values: dict[str, str] | None = None) -> list[int]:
    """The prompt of `problem` under a prompt spec (the `data` or the `eval` section): the problem as-is
    (plain), or `prompt_template` with `{problem}` (and `values`) filled in, through the chat template."""
    if spec.prompt_format == "plain":
        return tokenizer(problem, add_special_tokens=False)["input_ids"]
    content = fill_template(spec.prompt_template, {"problem": problem, **(values or {})})
    return chat_prompt_ids(tokenizer, content, spec.system_prompt, spec.enable_thinking, spec.assistant_prefix)


def build_prompt(row: dict, cfg, tokenizer) -> list[int]:
    """A training row's prompt (the `data` section); an empty data.instruction leaves the problem bare."""
    if cfg.prompt_format == "chat" and not cfg.instruction:
        return chat_prompt_ids(tokenizer, row["problem"], cfg.system_prompt, cfg.enable_thinking, cfg.assistant_prefix)
    return prompt_ids(cfg, row["problem"], tokenizer, {"instruction": cfg.instruction})


def fill_template(template: str, values: dict[str, str]) -> str:
    """`template` with each `{name}` of `values` replaced in one pass, so that a problem text that
    happens to contain `{solution}` is left as it is."""
    return re.sub(r"\{(" + "|".join(map(re.escape, values)) + r")\}", lambda m: values[m.group(1)], template)


def build_teacher_prompt(row: dict, cfg, tokenizer, template: str, teacher_instruction: str,
                         enable_thinking) -> list[int]:
    """OPSD's privileged context, from `template` (opsd.teacher_template): the problem, the reference
    solution, the instruction to understand it and derive the answer itself, the answer format."""
    if "solution" not in row:
        raise DataError(
            f"OPSD needs a reference solution per row, but this row has none (columns: {sorted(row)}). "
            "Use a set with worked solutions (GSM8K, MATH, the OPSD set) or add a `solution` column."
        )
    content = fill_template(template, {"problem": row["problem"], "solution": row["solution"],
                                       "teacher_instruction": teacher_instruction, "instruction": cfg.instruction})
    if cfg.prompt_format == "plain":
        return tokenizer(content, add_special_tokens=False)["input_ids"]
    return chat_prompt_ids(tokenizer, content, cfg.system_prompt, enable_thinking)


class PromptStream:
    """Rows in a fixed order, epoch after epoch (reshuffled per epoch with the seed).

    `position` counts rows handed out so far: with the seed it fully determines what comes next,
    which is what a resume needs.
    """

    def __init__(self, rows: list[dict], seed: int, shuffle: bool = True, position: int = 0):
        if not rows:
            raise DataError("The training set is empty after filtering.")
        self.rows, self.seed, self.shuffle, self.position = rows, seed, shuffle, position
        self._cached: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            order = list(range(len(self.rows)))
            if self.shuffle and epoch > 0:  # epoch 0 keeps load_rows' (seeded) order
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.rows))
            out.append(self.rows[self._order(epoch)[i]])
            self.position += 1
        return out
