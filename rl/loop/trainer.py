"""The loop: generate -> prepare -> update x k -> push -> record.

`train` builds a `TrainingRun` (everything a run holds, built once) and runs its steps. The
algorithm drives its own scoring and updates through a narrow learner handle (`BoundLearner`); the
loop never looks at what it computes, only at the names rl.core.contracts declares.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

from rl.algorithms import build_algorithm
from rl.config import RunConfig
from rl.data import PromptStream, check_prompts_fit, load_rows
from rl.evaluate import Evaluator, eval_due
from rl.loop import checkpoint
from rl.loop.cluster import init_ray, place
from rl.loop.collect import CollectedRollouts, collect_rollouts, mean
from rl.loop.guards import DivergenceGuard, EngineRecovery, GracefulStop, has_signal
from rl.loop.overlap import RolloutsAhead
from rl.loop.stopped import RunStopped
from rl.loop.tracking import Console, Tracker, keep_actor_logs
from rl.models import context_length, resolve_model_path, vocab_size
from rl.sync.check import SyncCheck
from rl.sync.weight_sync import WeightPusher
from rewards.scoring import RewardScorer, correctness_index, log_failures


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, stop: GracefulStop | None = None,
          console: Console | None = None) -> dict:
    """Run cfg.train.steps steps, with `resume` from run_dir's newest checkpoint on; returns the
    last step's metrics. Raises RunStopped when a guard stops the run, when the engines fail past
    rollout.max_restarts, when a learner rank dies, or (after saving a checkpoint) when `stop`
    saw Ctrl-C / SIGTERM: then no final model is written."""
    from rl.learner.group import LearnerRankError

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run = TrainingRun(cfg, run_dir, resume, console)
    try:
        return run.steps(stop)
    except LearnerRankError as e:
        cause = str(e).splitlines()[0].rstrip(".")  # Ray's death notice goes on for lines
        raise RunStopped(f"{cause}. A learner rank cannot be replaced mid-run, so the run stops here. "
                         f"{checkpoint.checkpoint_note(run_dir)}") from None
    finally:
        run.close()


class BoundLearner:
    """The learner as an algorithm sees it (rl.algorithms.base.Learner): the learner group at the
    algorithm's loss temperature, each optimizer step handed to `on_update` (the divergence guard)."""

    def __init__(self, learners, temperature: float, on_update):
        self.learners, self.temperature, self.on_update = learners, temperature, on_update

    def score(self, batch, *, reference: bool = False, entropy: bool = False):
        return self.learners.compute_logprobs(batch, self.temperature, with_entropy=entropy, reference=reference)

    def train(self, batch, loss, *, return_logprobs: bool = False):
        result = self.learners.train_step(batch, loss, self.temperature, return_logprobs=return_logprobs)
        self.on_update(result[0] if return_logprobs else result)
        return result


class TrainingRun:
    """Everything a run holds, built once: data, algorithm, rewards, cluster, engines, learners,
    weight transport, trackers and guards; `steps` runs it, `close` ends it however it went."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool, console: Console | None):
        self.cfg, self.run_dir = cfg, run_dir
        self._closers: list[tuple[str, object]] = []
        self._build_data_and_algorithm()  # in seconds, before the cluster starts
        scoring = self.algorithm.requirements.scoring_engines
        init_ray(cfg, scoring)
        self.plan = place(cfg, scoring)
        self._closers.append(("release the placement group", self.plan.release))
        self._build_workers()
        self.done, saved = (checkpoint.resume(run_dir, cfg, self.learners, self.weights.push, self.stream) if resume
                            else (checkpoint.TrainerState(), None))
        self.console = console or Console(cfg.train.steps, self.done.step + 1)
        self._build_tracking()
        self.ahead = RolloutsAhead(self._rollouts_for, cfg.train.steps, cfg.train.max_staleness > 0, saved)
        self._closers.append(("stop the rollouts in flight", self.ahead.close))
        self.step, self.version = self.done.step, self.done.step  # the learner's weight updates so far
        self.saved_step = self.done.step if resume else -1
        self.next_start, self.rollout_tokens = self.stream.position, self.done.cumulative_rollout_tokens

    def _build_data_and_algorithm(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.model_path = resolve_model_path(cfg.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.stream = PromptStream(load_rows(cfg.data, cfg.seed), cfg.seed, shuffle=cfg.data.shuffle)
        check_prompts_fit(self.stream.rows, cfg.data, self.tokenizer)
        self.algorithm = build_algorithm(cfg)  # refuses a reward set without a correctness signal it needs
        self.algorithm.attach_tokenizer(self.tokenizer)
        self.has_correctness = correctness_index(cfg.reward.functions) is not None
        self.scorer = RewardScorer.from_config(cfg.reward, max_tokens=cfg.rollout.max_tokens)
        self._closers.append(("close the reward workers", self.scorer.close))
        self.spec = self.algorithm.sampling_spec()
        self.evaluator = Evaluator(self.tokenizer, cfg.eval) if cfg.eval.every_steps or cfg.eval.at_start else None

    def _build_workers(self) -> None:
        from rl.learner.group import LearnerGroup
        from rollouts.pool import RolloutPool
        from rollouts.registry import engine_class

        cfg, needs = self.cfg, self.algorithm.requirements
        colocated = cfg.ray.placement == "colocate"
        # Colocated engines that can sleep free the GPU while the learners train (vLLM on GPU).
        self.sleeps = colocated and self.plan.on_gpu and engine_class(cfg.rollout.engine).can_sleep
        evaluated = self.evaluator.context_tokens() if self.evaluator else 0
        settings = cfg.rollout.engine_settings(
            cfg.model, max_model_len=max(cfg.data.max_prompt_tokens + cfg.rollout.max_tokens, evaluated),
            colocated=colocated, sleep_mode=self.sleeps, prompt_mask_prob=needs.prompt_mask_prob,
            estimator=needs.estimator, estimator_samples=needs.estimator_samples,
        )
        # Engines and learner ranks start side by side (their first seconds are imports of vLLM and
        # DeepSpeed), except colocated on GPUs, where vLLM sizes its cache from the memory it finds free.
        side_by_side = not (colocated and self.plan.on_gpu)
        self.pool = RolloutPool(cfg.rollout.engine, self.model_path, num_engines=cfg.rollout.num_engines, seed=cfg.seed,
                                engine_cpus=cfg.rollout.engine_cpus, placement=self.plan, timeout_s=cfg.rollout.timeout_s,
                                settings=settings, plugins=cfg.plugins, wait=not side_by_side)
        self._closers.append(("stop the rollout engines", self.pool.close))
        self.learners = LearnerGroup(
            self.model_path, cfg.learner, cfg.model.dtype, seed=cfg.seed,
            total_steps=cfg.train.steps * needs.updates_per_batch, with_reference=needs.reference,
            teacher=needs.teacher, lora=cfg.model.lora, diffusion=self._diffusion_forward(), placement=self.plan,
            plugins=cfg.plugins, wait=not side_by_side,
        )
        self._closers.append(("stop the learner ranks", self.learners.close))
        scorers = self._start_scoring_engines(settings)
        if side_by_side:
            self.pool.wait_started()
            self.learners.wait_started()
        if scorers:
            for pool in scorers.values():
                pool.wait_started()
            self.algorithm.attach_scoring_engines(scorers)
        self.weights = WeightPusher(cfg.sync, self.pool, self.learners, self.plan)
        print(f"weight sync: {self.weights}", file=sys.stderr, flush=True)
        self.sync_check = SyncCheck(cfg, self.pool, self.learners)

    def _start_scoring_engines(self, settings) -> dict:
        """The engines of the algorithm's other models (teachers too large for the learner ranks), by
        name, each in bundles of its own in the plan, not yet waited for."""
        from rollouts.pool import RolloutPool

        pools, first = {}, 0
        for scoring in self.algorithm.requirements.scoring_engines:
            path = resolve_model_path(scoring.model_path)
            context = scoring.max_model_len or min(4096, context_length(path))
            pools[scoring.name] = RolloutPool(
                self.cfg.rollout.engine, path, num_engines=scoring.num_engines, seed=self.cfg.seed, placement=self.plan,
                slots=self.plan.scorers[first : first + scoring.num_engines], timeout_s=self.cfg.rollout.timeout_s,
                settings=dataclasses.replace(settings, max_model_len=context, tensor_parallel_size=scoring.gpus_per_engine),
                plugins=self.cfg.plugins, wait=False)
            self._closers.append((f"stop the engines of {scoring.name}", pools[scoring.name].close))
            first += scoring.num_engines
        return pools

    def _diffusion_forward(self):
        """The learner's one-step estimator settings for a masked-diffusion model (None: causal)."""
        from rl.learner.model import DiffusionForward
        from rollouts.diffusion import resolve_mask_id

        cfg = self.cfg
        if cfg.model.kind != "masked_diffusion":
            return None
        mask_id = resolve_mask_id(self.tokenizer, cfg.rollout.diffusion.mask_token_id)
        needs = self.algorithm.requirements
        return DiffusionForward(cfg.rollout.max_tokens, mask_id, needs.prompt_mask_prob, cfg.model.trust_remote_code,
                                needs.estimator, needs.estimator_samples)

    def _build_tracking(self) -> None:
        cfg, run_dir, console = self.cfg, self.run_dir, self.console
        self.tracker = Tracker(run_dir, cfg.train.steps, cfg.model_dump(mode="json"), cfg.tracking.wandb,
                               cfg.tracking.tensorboard, console=console)
        self._closers.append(("close the trackers", self.tracker.close))
        self.guard = DivergenceGuard(cfg.train.max_skipped_updates, cfg.train.stop_on_collapse,
                                     vocab_size(self.model_path, self.tokenizer), run_dir, warn=console.line)
        if self.done.step and (run_dir / "metrics.jsonl").exists():  # resumed: against the run's own first step
            from rl.plot import read_records

            self.guard.resume_from(read_records(run_dir))
        self.recovery = EngineRecovery(self.pool, self._resync, cfg.rollout.max_restarts, run_dir, warn=console.line)
        self.learner = BoundLearner(self.learners, self.algorithm.loss_temperature(),
                                    lambda metrics: self.guard.record_update(self.step, metrics))

    def _resync(self) -> None:
        """After engines were replaced: the learner's weights, through the run's own transport."""
        self.weights.engines_replaced()
        self.weights.push()

    def _rollouts_for(self, step: int, start: int) -> tuple[CollectedRollouts, int]:
        """Step `step`'s rollouts from prompt position `start`, and the position after them. An engine
        that dies is replaced and the generation retried (EngineRecovery)."""

        def generate():
            self.stream.position = start  # a retried step takes the same prompts
            self.pool.set_step_seed(checkpoint.step_seed(self.cfg.seed, step))
            rollouts = collect_rollouts(self.stream, self.pool, self.scorer, self.algorithm, self.spec, self.cfg,
                                        self.tokenizer)
            return rollouts, self.stream.position

        return self.recovery.run(step, "generation", generate)

    def steps(self, stop: GracefulStop | None) -> dict:
        cfg, metrics = self.cfg, {}
        if self.evaluator is not None and self.done.step == 0 and eval_due(cfg.eval, 0, cfg.train.steps):
            evaluation = self.evaluator.run(self.pool, self.run_dir / "eval" / "step_000000")
            self.tracker.log(0, {**evaluation, "cumulative_rollout_tokens": 0})
        for step in range(self.done.step + 1, cfg.train.steps + 1):
            if stop is not None and stop.requested:
                self._stop_on_signal(stop)
            self.step = step
            metrics = self.one_step(step)
        if cfg.train.save_final:
            self.console.stage("saving the final model")
            self.learners.save_hf(str(self.run_dir / "final"))
        return metrics

    def one_step(self, step: int) -> dict:
        """generate -> prepare -> update x k -> push -> record."""
        times = {"start": time.time()}
        self.console.stage("generation")
        collected, self.next_start, made_with = self.ahead.take(step, self.next_start, self.version)
        age = self.version - made_with
        if age > self.cfg.train.max_staleness:
            raise RuntimeError(f"step {step}: a batch {age} versions old exceeds train.max_staleness")
        times["learner"] = time.time()
        self.console.stage("learner")
        if self.sleeps:
            self.pool.sleep()
        batch, built = self.algorithm.build_batch(collected.rollouts)
        batch, prepared = self.algorithm.prepare(batch, self.learner)
        update = self.algorithm.update(batch, self.learner)
        self.version += 1
        self.ahead.wait()  # the engines must be idle before their weights change
        times["sync"] = time.time()
        self.console.stage("weight sync")
        if self.sleeps:
            self.pool.wake_up()
        algo_metrics = {**built, **prepared, **update.metrics}
        pushed, checked = self.recovery.run(step, "weight sync", lambda: self._push(step, update.checked, algo_metrics, age))
        times["end"] = time.time()
        metrics = self._record(step, collected, update.train_metrics, algo_metrics, checked, pushed, times, age)
        self.guard.check(step, metrics, has_signal(update.checked.token_fields))
        return metrics

    def _push(self, step: int, batch, algo_metrics: dict, age: int) -> tuple[dict, dict]:
        pushed = self.weights.push()
        evaluating = self.evaluator is not None and eval_due(self.cfg.eval, step, self.cfg.train.steps)
        return pushed, self.sync_check(step, batch, algo_metrics, age, evaluating)

    def _record(self, step: int, collected: CollectedRollouts, train_metrics: dict, algo_metrics: dict, checked: dict,
                pushed: dict, times: dict, age: int) -> dict:
        """The step's metrics logged, an evaluation and a checkpoint when due."""
        cfg = self.cfg
        log_failures(self.run_dir / "reward_failures.jsonl", step, collected.failures)
        lengths = [len(c.token_ids) for c, _ in collected.generated]
        spent = sum(lengths) + sum(len(c.token_ids) for c in collected.repair_completions)
        self.rollout_tokens += spent
        metrics = {
            **rollout_metrics(collected, lengths), "rollout_tokens": spent, "cumulative_rollout_tokens": self.rollout_tokens,
            **algo_metrics, **learner_metrics(dict(train_metrics)), "skipped_updates": self.guard.skipped,
            "engine_restarts": self.recovery.restarts,
            **checked, **{f"time/{k}" if k.endswith("_s") else k: v for k, v in pushed.items()},
            "time/generation": collected.generation_s, "time/reward": collected.reward_s,
            "time/learner": times["sync"] - times["learner"], "time/sync": times["end"] - times["sync"],
            "time/wait_rollouts": times["learner"] - times["start"], "batch_age": age,
        }
        if self.evaluator is not None and eval_due(cfg.eval, step, cfg.train.steps):
            metrics.update(self.evaluator.run(self.pool, self.run_dir / "eval" / f"step_{step:06d}"))
        if self.has_correctness:  # the share of this step's sampled completions the correctness reward passed
            metrics["accuracy"] = mean(collected.correct)
        metrics.update(self.guard.relative(metrics))  # entropy and length against the first step
        self.tracker.log(step, metrics)
        if checkpoint.save_due(cfg, step):
            self._save(step)
        return metrics

    def _save(self, step: int) -> None:
        state = checkpoint.TrainerState(step, self.next_start, self.rollout_tokens)
        checkpoint.save(self.run_dir, self.cfg, self.learners, state, self.ahead.saved())
        self.saved_step = step

    def _stop_on_signal(self, stop: GracefulStop) -> None:
        """The safe point after the last step once Ctrl-C / SIGTERM came: save (unless told not to), then stop."""
        if self.step >= 1 and self.cfg.checkpoint.on_interrupt and self.saved_step != self.step:
            self._save(self.step)
        raise RunStopped(f"Stopped after step {self.step} of {self.cfg.train.steps} on request. "
                         f"{checkpoint.checkpoint_note(self.run_dir)}", exit_code=stop.exit_code)

    def close(self) -> None:
        """Each cleanup step runs whatever the others did; its failure is a warning, never the error
        the run reports (a full disk fails the checkpoint first, then the log copy)."""
        console = getattr(self, "console", None) or Console(self.cfg.train.steps)
        for what, step in reversed(self._closers):
            _cleanup(console, what, step)
        _cleanup(console, "keep the logs and draw the curves", lambda: _after_run(self.run_dir, console))


def rollout_metrics(collected: CollectedRollouts, lengths: list[int]) -> dict:
    """What was generated: rewards and their parts, failures, lengths, rounds, groups trained."""
    return {
        "reward": mean(collected.totals),
        **{f"reward/{k}": mean(v) for k, v in collected.parts.items()},
        **collected.counts,
        "response_length": mean(lengths),
        "truncated_fraction": mean(c.truncated for c, _ in collected.generated),
        "prompts_skipped_too_long": collected.skipped_prompts,
        "sampling_rounds": collected.rounds,
        "groups_trained": len(collected.rollouts.rows),
        **diffusion_metrics(collected.generated),
    }


def diffusion_metrics(generated) -> dict:
    """Masked-diffusion engines: the model calls per block their sampler took (parallel decoding varies it)."""
    calls = [c.sampler_calls for c, _ in generated if getattr(c, "sampler_calls", None) is not None]
    return {"rollout/diffusion_calls_per_block": mean(calls)} if calls else {}


def learner_metrics(train_metrics: dict) -> dict:
    """The last optimizer step's: loss, grad norm, lr, and each `<name>_sum` per trained token."""
    tokens = max(train_metrics.pop("tokens", 1.0), 1.0)
    return {
        "loss": train_metrics.pop("loss", float("nan")),
        "grad_norm": train_metrics.pop("grad_norm", float("nan")),
        "lr": train_metrics.pop("lr", float("nan")),
        **{k.removesuffix("_sum"): v / tokens for k, v in train_metrics.items() if k.endswith("_sum")},
    }


def _cleanup(console: Console, what: str, step) -> None:
    try:
        step()
    except Exception as e:
        console.line(f"warning (cleanup, after the run ended): could not {what}: {type(e).__name__}: {e}")


def _after_run(run_dir: Path, console: Console) -> None:
    """Whatever happened: the actors' logs into <run>/logs, the curves into <run>/curves.png."""
    from rl.plot import draw

    try:
        keep_actor_logs(run_dir)
    except Exception as e:  # a full disk, most often: a warning, the plot may still fit
        console.line(f"warning (cleanup, after the run ended): could not copy the actors' logs into {run_dir / 'logs'}: "
                     f"{type(e).__name__}: {e}")
    if (run_dir / "metrics.jsonl").exists():
        try:
            draw(run_dir)
        except Exception as e:  # a plot must never hide why the run ended
            console.line(f"warning: could not draw {run_dir / 'curves.png'}: {type(e).__name__}: {e}")
