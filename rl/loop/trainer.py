"""The loop: rollouts -> rewards -> algorithm -> learner -> weight sync -> check -> record."""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rl.loop import checkpoint
from rl.algorithms import Rollouts, build_algorithm
from rl.algorithms.base import SampledRound
from rl.core.batch import SequenceBatch
from rl.config import RunConfig
from rl.core.paths import PROJECT_ROOT
from rl.data import DataError, PromptStream, build_prompt, check_prompts_fit, load_rows
from rl.evaluate import Evaluator, eval_due
from rl.loop.guards import DivergenceGuard, EngineRecovery, GracefulStop, has_signal
from rl.loop.stopped import RunStopped
from rl.models import resolve_model_path, vocab_size
from rl.learner.prompt_masks import prompt_mask_schedule
from rl.loop.tracking import Console, Tracker, keep_actor_logs
from rl.sync.check import SyncCheck
from rl.sync.weight_sync import build_weight_sync
from rewards.scoring import RewardScorer, correctness_index, log_failures


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster `ray.address` (or RAY_ADDRESS) names, else start one on this machine."""
    import ray

    from rl.loop.local_cluster import ClusterError, LocalCluster

    if ray.is_initialized():
        return
    # Workers must import this checkout's code: a local cluster's workers inherit the driver's
    # environment, an existing cluster's get it through the job's runtime environment (every node
    # needs the project at the same path, or installed).
    paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    # Actors' output stays in their log files (copied to <run>/logs) unless tracking.verbose.
    quiet = dict(log_to_driver=cfg.tracking.verbose, logging_level=logging.INFO if cfg.tracking.verbose else logging.ERROR)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # Ray's own word for "start a cluster here"
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}, **quiet)
        except ConnectionError as e:
            raise ClusterError(
                f"Could not join the Ray cluster at ray.address={address!r}: {e}. Start it first (`ray start "
                "--head` on one node, `ray start --address=HEAD_IP:6379` on the others), or leave ray.address "
                "unset (and RAY_ADDRESS empty) to start a cluster on this machine."
            ) from e
        return
    from rl.loop.placement import ResourcePlan

    # Refused before anything starts if the plan needs more CPUs than this machine can share out.
    num_cpus = ResourcePlan.from_config(cfg, on_gpu=False).local_cpus(len(os.sched_getaffinity(0)))
    # A cluster that dies with this process, whatever ends it (rl/loop/local_cluster.py).
    global _local_cluster
    if _local_cluster is not None:  # one this process started before and disconnected from
        _local_cluster.stop()
    _local_cluster = LocalCluster(num_cpus)
    ray.init(address=_local_cluster.address, **quiet)


_local_cluster = None  # the cluster init_ray started on this machine, if any


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address must answer within seconds: Ray itself would retry an absent GCS for
    minutes, printing time-out warnings."""
    import socket

    from rl.loop.local_cluster import ClusterError

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto" and the like: Ray finds the cluster itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(
            f"No Ray cluster answers at ray.address={address!r} ({host}:{port}: "
            f"{e.strerror or type(e).__name__} within {timeout_s:.0f} s). Start it first (`ray start --head "
            "--port=6379` on the head node, `ray start --address=HEAD_IP:6379` on the others) and give the head "
            "node's address, or leave ray.address unset (and RAY_ADDRESS empty) to start a cluster on this machine."
        ) from None


def place(cfg: RunConfig):
    """The run's resource plan, checked against the cluster and reserved; printed."""
    import ray

    from rl.loop.placement import ResourcePlan

    plan = ResourcePlan.from_config(cfg, on_gpu=ray.cluster_resources().get("GPU", 0) > 0).apply()
    print(plan.table(), file=sys.stderr, flush=True)
    return plan


def _take_prompts(stream: PromptStream, n: int, cfg: RunConfig, tokenizer) -> tuple[list[dict], list[list[int]], int]:
    rows, prompts, skipped = [], [], 0
    while len(rows) < n:
        for row in stream.take(n - len(rows)):
            ids = build_prompt(row, cfg.data, tokenizer)
            if len(ids) > cfg.data.max_prompt_tokens:
                skipped += 1
                if skipped > 100 * n:
                    raise DataError(
                        f"Nearly every prompt is longer than data.max_prompt_tokens={cfg.data.max_prompt_tokens} "
                        f"({skipped} skipped for {len(rows)} kept); raise data.max_prompt_tokens."
                    )
                continue
            rows.append(row)
            prompts.append(ids)
    return rows, prompts, skipped


@dataclass
class CollectedRollouts:
    """The groups a step trains on, and everything generated for it (dropped groups included:
    their tokens were spent, so they count in the token budget and the reward curves)."""

    rollouts: Rollouts
    generated: list[tuple] = field(default_factory=list)  # (completion, row) pairs
    totals: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)  # empty when the reward set has no correctness signal
    parts: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    failures: list = field(default_factory=list)
    repair_completions: list = field(default_factory=list)  # generated by the algorithm (IGPO's inpainting)
    skipped_prompts: int = 0
    rounds: int = 0
    generation_s: float = 0.0
    reward_s: float = 0.0


def _split(values: list, groups: list[list]) -> list[list]:
    out, start = [], 0
    for group in groups:
        out.append(values[start : start + len(group)])
        start += len(group)
    return out


def collect_rollouts(stream, pool, scorer, algorithm, spec, cfg: RunConfig, tokenizer) -> CollectedRollouts:
    """Generate and score groups until `prompts_per_step` groups the algorithm keeps are collected
    (one round unless it drops groups, as dynamic sampling does; at most max_sampling_rounds).
    Each round's groups pass through the algorithm's repair_groups before it keeps or drops them."""
    want = cfg.train.prompts_per_step
    out = CollectedRollouts(Rollouts(rows=[], prompt_ids=[], completions=[], rewards=[]))

    def score(completions, rows) -> tuple[list[float], list[bool]]:
        info = [{"completion_tokens": len(c.token_ids), "truncated": c.truncated} for c in completions]
        scored = scorer.score([c.text for c in completions], rows, info)
        out.failures += scored.failures
        return scored.totals, scored.correct or []

    while len(out.rollouts.rows) < want and out.rounds < algorithm.requirements.sampling_rounds:
        out.rounds += 1
        t0 = time.time()
        rows, prompts, skipped = _take_prompts(stream, want - len(out.rollouts.rows), cfg, tokenizer)
        groups = pool.generate(prompts, spec)
        t1 = time.time()
        flat = [(c, row) for row, group in zip(rows, groups) for c in group]
        info = [{"completion_tokens": len(c.token_ids), "truncated": c.truncated} for c, _ in flat]
        scored = scorer.score([c.text for c, _ in flat], [row for _, row in flat], info)
        out.generation_s += t1 - t0
        out.reward_s += time.time() - t1
        out.skipped_prompts += skipped
        out.generated += flat
        out.totals += scored.totals
        out.failures += scored.failures
        for k, v in scored.parts.items():
            out.parts.setdefault(k, []).extend(v)
        for k, v in scored.counts.items():
            out.counts[k] = out.counts.get(k, 0) + v
        out.correct += scored.correct or []
        sampled = SampledRound(rows, prompts, groups, _split(scored.totals, groups), _split(scored.correct or [], groups))
        t2 = time.time()
        repair = algorithm.repair_groups(sampled, pool.generate, score)
        out.generation_s += time.time() - t2
        out.repair_completions += repair.generated
        for k, v in repair.counts.items():
            out.rollouts.repair_counts[k] = out.rollouts.repair_counts.get(k, 0) + v
        sampled = repair.sampled
        for row, prompt, group, rewards, correct in zip(rows, prompts, sampled.completions, sampled.rewards, sampled.correct):
            if algorithm.keep_group(rewards, correct) and len(out.rollouts.rows) < want:
                out.rollouts.rows.append(row)
                out.rollouts.prompt_ids.append(prompt)
                out.rollouts.completions.append(group)
                out.rollouts.rewards.append(rewards)
    if not out.rollouts.rows:
        raise RuntimeError(
            f"No group with a learning signal in {out.rounds} sampling rounds (every group's rewards "
            "were equal). The task may be too hard or too easy for the model; raise "
            "grpo.max_sampling_rounds or turn grpo.dynamic_sampling off."
        )
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, stop: GracefulStop | None = None,
          console: Console | None = None) -> dict:
    """Run cfg.train.steps steps, with `resume` from run_dir's newest checkpoint on; returns the
    last step's metrics. Raises RunStopped when a guard stops the run, when the engines fail past
    rollout.max_restarts, when a learner rank dies, or (after saving a checkpoint) when `stop`
    saw Ctrl-C / SIGTERM: then no final model is written."""
    from transformers import AutoTokenizer

    from rl.learner.group import DiffusionForward, LearnerGroup, LearnerRankError
    from rollouts.diffusion import resolve_mask_id
    from rollouts.pool import RolloutPool

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    stream = PromptStream(load_rows(cfg.data, cfg.seed), cfg.seed, shuffle=cfg.data.shuffle)
    check_prompts_fit(stream.rows, cfg.data, tokenizer)  # in seconds, before the cluster starts
    algorithm = build_algorithm(cfg)
    algorithm.attach_tokenizer(tokenizer)
    has_correctness = correctness_index(cfg.reward.functions) is not None  # build_algorithm refused a set without one if needed
    needs = algorithm.requirements
    scorer = RewardScorer.from_config(cfg.reward, max_tokens=cfg.rollout.max_tokens)
    spec = algorithm.sampling_spec()
    # Built before the cluster starts, so that evaluation data errors surface in seconds.
    evaluator = None
    if cfg.eval.every_steps or cfg.eval.at_start:
        evaluator = Evaluator(tokenizer, cfg.eval)

    diffusion = None
    if cfg.model.kind == "masked_diffusion":
        mask_id = resolve_mask_id(tokenizer, cfg.rollout.diffusion.mask_token_id)
        diffusion = DiffusionForward(cfg.rollout.max_tokens, mask_id, needs.prompt_mask_prob, cfg.model.trust_remote_code)

    init_ray(cfg)
    plan = place(cfg)
    colocated = cfg.ray.placement == "colocate"
    # Colocated vLLM on GPU sleeps while the learners train (a no-op elsewhere).
    sleeps = colocated and plan.on_gpu and cfg.rollout.engine == "vllm"
    pool = RolloutPool(
        cfg.rollout.engine,
        model_path,
        num_engines=cfg.rollout.num_engines,
        seed=cfg.seed,
        engine_cpus=cfg.rollout.engine_cpus,
        placement=plan,
        timeout_s=cfg.rollout.timeout_s,
        **cfg.rollout.engine_options(
            cfg.model,
            max_model_len=max(cfg.data.max_prompt_tokens + cfg.rollout.max_tokens, evaluator.context_tokens() if evaluator else 0),
            colocated=colocated,
            sleep_mode=sleeps,
            prompt_mask_prob=needs.prompt_mask_prob,
        ),
    )
    learners = LearnerGroup(
        model_path,
        cfg.learner,
        cfg.model.dtype,
        seed=cfg.seed,
        total_steps=cfg.train.steps * needs.updates_per_batch,
        with_reference=needs.reference,
        teacher=needs.teacher,
        lora=cfg.model.lora,
        diffusion=diffusion,
        placement=plan,
    )
    weight_sync = build_weight_sync(cfg.sync, pool, learners, plan)
    print(f"weight sync: {weight_sync}", file=sys.stderr, flush=True)
    synced_restarts = 0  # engine restarts when weight_sync was built
    sync_check = SyncCheck(cfg, pool, learners)
    done, saved_ahead = checkpoint.resume(run_dir, cfg, learners, pool, stream) if resume else (checkpoint.TrainerState(), None)
    console = console or Console(cfg.train.steps, done.step + 1)
    tracker = Tracker(run_dir, cfg.train.steps, cfg.model_dump(mode="json"), cfg.tracking.wandb, cfg.tracking.tensorboard,
                      console=console)
    guard = DivergenceGuard(cfg.train.max_skipped_updates, cfg.train.stop_on_collapse,
                            vocab_size(model_path, tokenizer), run_dir, warn=console.line)
    recovery = EngineRecovery(pool, learners.full_state_dict, cfg.rollout.max_restarts, run_dir, warn=console.line)
    temperature = algorithm.loss_temperature()
    rollout_tokens = done.cumulative_rollout_tokens
    metrics: dict = {}

    def rollouts_for(step: int, start: int) -> tuple[CollectedRollouts, int]:
        """Step `step`'s rollouts from prompt position `start`, and the position after them. An
        engine that dies is replaced and the generation retried (EngineRecovery)."""

        def generate():
            stream.position = start  # a retried step takes the same prompts
            pool.set_step_seed(checkpoint.step_seed(cfg.seed, step))
            return collect_rollouts(stream, pool, scorer, algorithm, spec, cfg, tokenizer), stream.position

        return recovery.run(step, "generation", generate)

    def push_and_check(step: int, batch: SequenceBatch, algo_metrics: dict, batch_age: int) -> tuple[dict, dict]:
        nonlocal weight_sync, synced_restarts
        if recovery.restarts != synced_restarts:
            # A replaced engine is not a member of the collective group: every member joins a new one.
            weight_sync.close()
            weight_sync, synced_restarts = build_weight_sync(cfg.sync, pool, learners, plan), recovery.restarts
        pushed = weight_sync.push()
        evaluating = evaluator is not None and eval_due(cfg.eval, step, cfg.train.steps)
        return pushed, sync_check(step, batch, algo_metrics, batch_age, evaluating)

    # train.max_staleness >= 1: the next step's rollouts are generated on this thread pool while
    # the learner trains. `version` counts the learner's weight updates; the engines hold the
    # version last pushed, and a batch's age is the learner's version minus the one it was sampled with.
    ahead = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if cfg.train.max_staleness else None
    in_flight = None  # (future, version sampled with)
    if saved_ahead is not None:  # resumed: the next step's rollouts as the checkpoint kept them
        in_flight = (_finished(saved_ahead[0]), saved_ahead[1])
    version = done.step
    saved_step = done.step if resume else -1
    next_start = stream.position  # where the next step's prompts begin (what a checkpoint records)
    try:
        if evaluator is not None and done.step == 0 and eval_due(cfg.eval, 0, cfg.train.steps):
            tracker.log(0, {**evaluator.run(pool, run_dir / "eval" / "step_000000"), "cumulative_rollout_tokens": 0})
        for step in range(done.step + 1, cfg.train.steps + 1):
            if stop is not None and stop.requested:
                _stop_on_signal(stop, step - 1, saved_step, run_dir, cfg, learners, next_start, rollout_tokens,
                                _ahead(in_flight))
            console.stage("generation")
            t_wait = time.time()
            if in_flight is None:
                (collected, next_start), made_with = rollouts_for(step, next_start), version
            else:
                (future, made_with), in_flight = in_flight, None
                collected, next_start = future.result()
            if ahead is not None and step < cfg.train.steps:
                # The next step's rollouts, sampled with the weights the engines hold now, while
                # the learner trains on this step's: one version behind when they are trained on.
                in_flight = (ahead.submit(rollouts_for, step + 1, next_start), version)
            batch_age = version - made_with
            if batch_age > cfg.train.max_staleness:
                raise RuntimeError(f"step {step}: a batch {batch_age} versions old exceeds train.max_staleness")
            wait_s = time.time() - t_wait
            log_failures(run_dir / "reward_failures.jsonl", step, collected.failures)
            rollouts, flat = collected.rollouts, collected.generated
            t2 = time.time()
            console.stage("learner")
            if sleeps:
                pool.sleep()

            batch, algo_metrics = algorithm.build_batch(rollouts)
            if needs.reference:
                ref_logprobs, _ = learners.compute_logprobs(batch, temperature, reference=True)
                batch = dataclasses.replace(batch, token_fields={**batch.token_fields, "ref_logprobs": ref_logprobs})
            if needs.policy_scores:
                scores = learners.compute_logprobs(batch, temperature, with_entropy=needs.entropy)
                batch, scored = algorithm.use_policy_scores(batch, *scores)
                algo_metrics.update(scored)
            masks = prompt_mask_schedule(batch, learners, temperature, needs.updates_per_batch, diffusion)
            if needs.policy_scores_from_training:  # one update: no mask schedule (it needs mu > 1)
                train_metrics, logprobs = learners.train_step(batch, algorithm.loss, temperature, return_logprobs=True)
                guard.record_update(step, train_metrics)
                algo_metrics.update(algorithm.use_policy_scores(batch, logprobs, None)[1])  # metrics only: trained
            else:
                for update in range(needs.updates_per_batch):
                    if masks is not None:
                        masks.use(update)  # d1: a fresh prompt mask per inner update
                    train_metrics = learners.train_step(batch, algorithm.loss, temperature)
                    guard.record_update(step, train_metrics)
            if masks is not None:
                masks.use(0)  # the mask the engines score with, for the weight-sync check
            version += 1
            if in_flight is not None:
                in_flight[0].result()  # the engines must be idle before their weights change
            t3 = time.time()
            console.stage("weight sync")

            if sleeps:
                pool.wake_up()
            push_metrics, sync_metrics = recovery.run(step, "weight sync", lambda: push_and_check(step, batch, algo_metrics, batch_age))
            t4 = time.time()

            lengths = [len(c.token_ids) for c, _ in flat]
            spent = sum(lengths) + sum(len(c.token_ids) for c in collected.repair_completions)
            rollout_tokens += spent
            tokens = max(train_metrics.pop("tokens", 1.0), 1.0)
            metrics = {
                "reward": _mean(collected.totals),
                **{f"reward/{k}": _mean(v) for k, v in collected.parts.items()},
                **collected.counts,
                "response_length": _mean(lengths),
                "truncated_fraction": _mean(c.truncated for c, _ in flat),
                "rollout_tokens": spent,
                "cumulative_rollout_tokens": rollout_tokens,
                "prompts_skipped_too_long": collected.skipped_prompts,
                "sampling_rounds": collected.rounds,
                "groups_trained": len(rollouts.rows),
                **algo_metrics,
                "loss": train_metrics.pop("loss", float("nan")),
                "grad_norm": train_metrics.pop("grad_norm", float("nan")),
                "lr": train_metrics.pop("lr", float("nan")),
                "skipped_updates": guard.skipped,
                "engine_restarts": recovery.restarts,
                **{k.removesuffix("_sum"): v / tokens for k, v in train_metrics.items() if k.endswith("_sum")},
                **sync_metrics,
                **{f"time/{k}" if k.endswith("_s") else k: v for k, v in push_metrics.items()},
                "time/generation": collected.generation_s,
                "time/reward": collected.reward_s,
                "time/learner": t3 - t2,
                "time/sync": t4 - t3,
                "time/wait_rollouts": wait_s,
                "batch_age": batch_age,
            }
            if evaluator is not None and eval_due(cfg.eval, step, cfg.train.steps):
                metrics.update(evaluator.run(pool, run_dir / "eval" / f"step_{step:06d}"))
            if has_correctness:  # the share of this step's sampled completions the correctness reward passed
                metrics["accuracy"] = _mean(collected.correct)
            tracker.log(step, metrics)
            if checkpoint.save_due(cfg, step):
                checkpoint.save(run_dir, cfg, learners, checkpoint.TrainerState(step, next_start, rollout_tokens),
                                _ahead(in_flight))
                saved_step = step
            guard.check(step, metrics, has_signal(batch.token_fields))
        if cfg.train.save_final:
            console.stage("saving the final model")
            learners.save_hf(str(run_dir / "final"))
    except LearnerRankError as e:
        cause = str(e).splitlines()[0].rstrip(".")  # Ray's death notice goes on for lines
        raise RunStopped(f"{cause}. A learner rank cannot be replaced mid-run, so the run stops here. {checkpoint.checkpoint_note(run_dir)}") from None
    finally:
        # Each cleanup step runs whatever the others did; its failure is a warning, never the error
        # the run reports (a full disk fails the checkpoint first, then the log copy).
        if ahead is not None:
            _cleanup(console, "stop the rollouts in flight", lambda: ahead.shutdown(wait=False, cancel_futures=True))
        _cleanup(console, "close the reward workers", scorer.close)
        _cleanup(console, "close the trackers", tracker.close)
        _cleanup(console, "stop the rollout engines", pool.close)
        _cleanup(console, "stop the learner ranks", learners.close)
        _cleanup(console, "release the placement group", plan.release)
        _cleanup(console, "keep the logs and draw the curves", lambda: _after_run(run_dir, console))
    return metrics


def _cleanup(console: Console, what: str, step) -> None:
    try:
        step()
    except Exception as e:
        console.line(f"warning (cleanup, after the run ended): could not {what}: {type(e).__name__}: {e}")


def _finished(result) -> Future:
    future = Future()
    future.set_result(result)
    return future


def _ahead(in_flight) -> tuple | None:
    """What a checkpoint keeps of the rollouts in flight: (their result, version sampled with). At a
    step's end they are finished: the engines were waited for before the weight push."""
    return None if in_flight is None else (in_flight[0].result(), in_flight[1])


def _stop_on_signal(stop: GracefulStop, step: int, saved_step: int, run_dir: Path, cfg: RunConfig, learners, position: int,
                    rollout_tokens: int, ahead: tuple | None) -> None:
    """The safe point after `step` once Ctrl-C / SIGTERM came: save (unless told not to), then stop."""
    if step >= 1 and cfg.checkpoint.on_interrupt and saved_step != step:
        checkpoint.save(run_dir, cfg, learners, checkpoint.TrainerState(step, position, rollout_tokens), ahead)
    raise RunStopped(f"Stopped after step {step} of {cfg.train.steps} on request. {checkpoint.checkpoint_note(run_dir)}",
                     exit_code=stop.exit_code)


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
