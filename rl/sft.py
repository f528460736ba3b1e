"""The supervised baseline: TRL's SFTTrainer on the training problems, reference solutions as targets.

    python -m rl.sft recipe=sft_qwen [key=value ...] [--print-config] [--dry-run]

--dry-run validates everything as `python -m rl.launch --dry-run` does (config, model path, the
batch, a local data file read and every row checked for a question, an answer and a solution),
loads no model, downloads nothing and exits: 0 when all is well, 2 with the problem named.

The OPSD paper's main table compares base / SFT / GRPO / OPSD; this is its SFT row (LoRA 64/128, lr
5e-6, batch 32, 100 steps in sft_qwen). Each example is the student's prompt (`data`: the chat
template, instruction and thinking switch that opsd_qwen trains with) followed by the row's
`solution` and the end token; with sft.completion_only_loss only the solution is trained on.
Steps, batch, optimiser and LoRA come from the same config sections as the RL recipes (see
rl.config.SFTConfig), so a comparison changes only the method.

Writes into the run directory (tracking.output_dir/<run_name>): config.yaml, metrics.jsonl (step,
loss, lr, grad_norm, cumulative_rollout_tokens = 0: SFT samples nothing) and final/ (an HF folder,
LoRA merged), so `python -m rl.evaluate model=RUN_DIR` evaluates it under the run's own `eval`
protocol, the one grpo_qwen and opsd_qwen record too.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rl.cli import UsageError, parse_command_line, tool_arguments
from rl.config import ConfigError, RunConfig, load_config
from rl.data import DataError, build_prompt, check_local_data, check_local_paths, load_rows


def sft_examples(cfg: RunConfig, tokenizer) -> list[dict]:
    """Tokenized examples: input_ids = prompt + solution + EOS, completion_mask marking the solution.

    Tokenized here (TRL skips its own tokenization for datasets with input_ids), so the prompt is
    exactly the one the RL recipes build, chat template and thinking switch included.
    """
    rows = load_rows(cfg.data, cfg.seed)
    _check_solutions(rows)
    examples, skipped = [], 0
    for row in rows:
        prompt = build_prompt(row, cfg.data, tokenizer)
        if len(prompt) > cfg.data.max_prompt_tokens:
            skipped += 1
            continue
        completion = list(tokenizer(row["solution"], add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            completion.append(tokenizer.eos_token_id)
        examples.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    if skipped:
        print(f"[sft] skipped {skipped} of {len(rows)} rows with prompts over data.max_prompt_tokens", flush=True)
    if not examples:
        raise DataError("No SFT example left after filtering; check data.train and data.max_prompt_tokens.")
    return examples


def _check_solutions(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        if not row.get("solution"):
            raise DataError(
                f"SFT needs a reference solution per row, but row {i} has none (columns: {sorted(row)}). "
                "Use a set with worked solutions (GSM8K, MATH, the OPSD set) or set data.solution_key."
            )


def _check_batch(cfg: RunConfig) -> None:
    micro = cfg.learner.micro_batch_size
    if cfg.train.prompts_per_step % micro:
        raise ConfigError(
            f"train.prompts_per_step ({cfg.train.prompts_per_step}) is the SFT batch and must be a multiple of "
            f"learner.micro_batch_size ({micro}); change one of them."
        )


def dry_run(cfg: RunConfig) -> tuple[list[str], str | None]:
    """Everything checked without loading a model or downloading: the model path, the batch, and a
    local training set read and checked row by row (a hub set is only named). Returns the notes
    and what was read of the data (None for a hub set)."""
    from rl.models import check_model_path

    check_model_path(cfg.model.path)
    _check_batch(cfg)
    notes = check_local_paths(cfg.data)
    checked = check_local_data(cfg.data, cfg.seed)
    if checked is not None:
        _check_solutions(load_rows(cfg.data, cfg.seed))
    return notes, checked


def _trainer_args(cfg: RunConfig, run_dir: Path):
    import torch
    from trl import SFTConfig

    _check_batch(cfg)
    micro = cfg.learner.micro_batch_size
    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run_dir / "trainer"),
        max_steps=cfg.train.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.train.prompts_per_step // micro,
        learning_rate=cfg.learner.lr,
        weight_decay=cfg.learner.weight_decay,
        adam_beta1=cfg.learner.betas[0],
        adam_beta2=cfg.learner.betas[1],
        warmup_steps=cfg.learner.warmup_steps,
        lr_scheduler_type="constant_with_warmup",  # the RL learner's schedule
        max_grad_norm=cfg.learner.max_grad_norm,
        gradient_checkpointing=cfg.learner.gradient_checkpointing,
        max_length=cfg.sft.max_length,
        completion_only_loss=cfg.sft.completion_only_loss,
        packing=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[t for t, on in (("tensorboard", cfg.tracking.tensorboard), ("wandb", cfg.tracking.wandb)) if on],
        use_cpu=not cuda,
        bf16=cuda and cfg.model.dtype == "bfloat16",
        dataloader_num_workers=0,
    )


def _metrics_callback(path: Path, total_steps: int):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """metrics.jsonl lines in the RL runs' keys, and one progress line per step with rate and ETA."""

        start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.time() - self.start
            line = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                    "grad_norm": logs.get("grad_norm"), "wall_time": elapsed, "cumulative_rollout_tokens": 0}
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")
            rate = state.global_step / elapsed if elapsed > 0 else 0.0
            eta = (total_steps - state.global_step) / rate if rate > 0 else float("nan")
            print(f"[sft] step {state.global_step}/{total_steps} | loss {logs['loss']:.4f} | "
                  f"{rate:.2f} steps/s | ETA {eta:.0f} s", file=sys.stderr, flush=True)

    return MetricsFile()


def train_sft(cfg: RunConfig, run_dir: Path) -> list[dict]:
    """Run the SFT baseline into run_dir; returns the metrics.jsonl lines."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.models import resolve_model_path

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    dataset = datasets.Dataset.from_list(sft_examples(cfg, tokenizer))
    args = _trainer_args(cfg, run_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
    )
    peft_config = None
    if cfg.model.lora.enabled:
        from peft import LoraConfig

        lora = cfg.model.lora
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[_metrics_callback(metrics_path, cfg.train.steps)])
    trainer.train()
    if cfg.train.save_final:
        final = trainer.model.merge_and_unload() if cfg.model.lora.enabled else trainer.model
        final.save_pretrained(str(run_dir / "final"))
        tokenizer.save_pretrained(str(run_dir / "final"))
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


USAGE = "\n\n".join(__doc__.split("\n\n")[1:3])  # the command line and --dry-run


def main(argv: list[str] | None = None) -> int:
    argv = tool_arguments(argv, USAGE)
    if argv is None:
        return 0
    from rl.models import ModelError

    try:
        # Every key but recipe= is a config override, checked by the config loader.
        line = parse_command_line(argv, USAGE, ("recipe",), ("--print-config", "--dry-run"), config_override=lambda key: True)
        print_config = "--print-config" in line.switches
        cfg = load_config(line.options.get("recipe"), line.overrides)
        if print_config:
            print(cfg.to_yaml())
        if "--dry-run" in line.switches:
            notes, checked = dry_run(cfg)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"config OK: recipe {cfg.recipe}, SFT, model {cfg.model.path}" + (f"; {checked}" if checked else ""),
                  file=sys.stderr)
            return 0
        if print_config:
            return 0
        name = cfg.tracking.run_name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.tracking.output_dir) / name
        lines = train_sft(cfg, run_dir)
    except (UsageError, ConfigError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[sft] {len(lines)} steps, final loss {lines[-1]['loss']:.4f}; run in {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
