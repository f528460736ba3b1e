"""Per-step records: one JSON line a step in the run directory, a live console line, optional W&B/TB."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONSOLE_KEYS = (
    ("reward", "reward {:.3f}"),
    ("accuracy", "acc {:.3f}"),
    ("response_length", "len {:.0f}"),
    ("logprob_gap", "gap {:.1e}"),
)


class Tracker:
    def __init__(self, run_dir: Path, total_steps: int, config: dict, wandb: bool = False, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.start = time.time()
        self._file = self.path.open("a")
        self._wandb = self._tb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RuntimeError("tracking.wandb=true but `wandb` is not installed: pip install wandb") from None
            self._wandb = wb.init(project="rl-reason", name=Path(run_dir).name, config=config)
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
        self._console(step, record)

    def _console(self, step: int, record: dict) -> None:
        elapsed = time.time() - self.start
        parts = [f"step {step}/{self.total}"]
        parts += [fmt.format(record[k]) for k, fmt in CONSOLE_KEYS if k in record]
        parts += [f"{k} {v:.3f}" for k, v in record.items() if k.startswith("eval/") and k.endswith("pass@1")]
        if step > 0:  # step 0 is the evaluation before training: no rate yet
            rate = step / elapsed
            parts.append(f"{elapsed / step:.1f}s/step, ETA {(self.total - step) / rate / 60:.1f} min")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
