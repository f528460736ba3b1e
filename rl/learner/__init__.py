"""The learner: data-parallel DeepSpeed ranks (ZeRO-2/3) that train on whatever loss they are given.

The learner knows nothing about the algorithm. A loss function is a picklable callable
`loss_fn(out: PolicyOutputs, mb: MicroBatch) -> (scalar, metrics)`. `out` holds the final hidden
states at the completion positions, the output layer's weight and the temperature (so that a loss
over a large vocabulary can work chunk by chunk, `rl.algorithms.divergences.chunked_divergence`), and
`out.logits()` for losses happy with materialised [B, T, V] float32 logits / temperature. The
scalar is this micro-batch's share of the step's GLOBAL loss (divided by `mb.loss_normalizer`), and
the metrics are sums (the learner adds `loss`, the sum of those scalars, itself). The gradient
applied is exactly d(sum of all micro-batch losses on all ranks)/d(theta), however the step is
split into micro-batches and ranks; see `StepRunner.train_step`.

A masked-diffusion model (`DiffusionForward`) runs whole instead: one forward on [prompt ; every
answer position masked] gives the logits at the answer positions (d1's one-step estimator), which
reach the loss as `out.hidden` with `out.lm_head_weight=None`.

A batch with a teacher view (OPSD) also gets a no-grad teacher forward on it per micro-batch,
aligned to the same completion tokens (`out.teacher_hidden`); the teacher settings' kind picks the
teacher: the frozen initial policy, the live policy, or an EMA copy. With `model.lora.enabled`
only peft adapters train, the frozen model is the same one with adapters disabled, and
`full_state_dict`/`save_hf` give merged weights under the base model's HF names.

Where each part lives:
- group.py: `LearnerGroup`, the ranks as Ray actors (sharding, gathering results, failures);
- worker.py: `LearnerWorker`, one rank (usable in-process with world_size=1), which builds the rest;
- model.py: the module DeepSpeed wraps (`_Policy`, `_DiffusionPolicy`) and model loading;
- lora.py: peft adapters and the merged weights the engines load;
- frozen.py: the frozen reference / teacher and the EMA teacher;
- micro_batches.py: a shard cut into padded or packed micro-batches on the device;
- step.py: `StepRunner`, the forward/backward/optimizer step and the no-grad scoring forward;
- export.py: `StateExport`, the HF weights (engines, save_hf) and run-state checkpoints;
- attention.py: piece attention for packed rows.
"""
