"""Per-step records: one JSON line a step in the run directory, the console's progress, optional W&B/TB."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

CONSOLE_KEYS = (
    ("reward", "reward {:.3f}"),
    ("accuracy", "acc {:.3f}"),
    ("response_length", "len {:.0f}"),
    ("logprob_gap", "gap {:.1e}"),
)


class Console:
    """What the operator sees: a header, then per step a live progress bar (on a terminal) or one
    line (otherwise) with rates, ETA and key metrics, warnings above it, and a closing summary.
    Actor logs are not here: they go to <run>/logs (`--verbose` shows them)."""

    def __init__(self, total_steps: int, first_step: int = 1, stream=None):
        self.stream = stream or sys.stderr
        self.total = total_steps
        self.first = first_step
        self.start = time.time()
        self.tokens = 0
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=first_step - 1, unit="step", file=self.stream,
                             dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def line(self, text: str) -> None:
        """A line of its own (header, warning, summary), kept above the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        """What the current step is doing (generation, learner, sync): shown live on a terminal."""
        if self._bar is not None:
            self._bar.set_description_str(name, refresh=True)

    def step(self, step: int, record: dict) -> None:
        elapsed = time.time() - self.start
        done = step - self.first + 1
        self.tokens += record.get("rollout_tokens", 0)
        parts = [fmt.format(record[k]) for k, fmt in CONSOLE_KEYS if k in record]
        parts += [f"{k} {v:.3f}" for k, v in record.items() if k.startswith("eval/") and k.endswith("pass@1")]
        if step > 0 and done > 0:  # step 0 is the evaluation before training: no rate yet
            parts.append(f"{elapsed / done:.1f}s/step, {self.tokens / max(elapsed, 1e-9):.0f} tok/s")
            if self._bar is None:
                parts.append(f"ETA {(self.total - step) * elapsed / done / 60:.1f} min")
        if self._bar is not None:
            self._bar.set_description_str("step", refresh=False)
            self._bar.set_postfix_str(" | ".join(parts), refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            print(" | ".join([f"step {step}/{self.total}", *parts]), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Tracker:
    def __init__(self, run_dir: Path, total_steps: int, config: dict, wandb: bool = False, tensorboard: bool = False,
                 console: Console | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.start = time.time()
        self.console = console or Console(total_steps)
        self._file = self.path.open("a")
        self._wandb = self._tb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RuntimeError("tracking.wandb=true but `wandb` is not installed: pip install wandb") from None
            # In the run folder: with WANDB_MODE=offline the run is kept there for a later `wandb sync`.
            self._wandb = wb.init(project="rl-reason", name=Path(run_dir).name, config=config, dir=str(run_dir))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("tracking.tensorboard=true but `tensorboard` is not installed: pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "wall_time": round(time.time() - self.start, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        self.console.step(step, record)

    def close(self) -> None:
        self.console.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def keep_actor_logs(run_dir: Path) -> Path | None:
    """Copy this Ray session's worker logs (the engines' and learner ranks' output, each file named
    by worker and pid) into <run>/logs, so they outlive Ray's temporary folder."""
    try:
        import ray

        node = ray._private.worker._global_node
        if not ray.is_initialized() or node is None:
            return None
        source = Path(node.get_logs_dir_path())
    except Exception:  # no local Ray node (a remote cluster keeps its logs on its nodes)
        return None
    out = Path(run_dir) / "logs"
    out.mkdir(parents=True, exist_ok=True)
    for path in source.glob("worker-*"):
        if path.suffix in (".out", ".err") and path.stat().st_size > 0:
            shutil.copyfile(path, out / path.name)
    return out
