"""The models a rank scores with besides the policy: the frozen initial policy (the KL reference,
OPSD's frozen teacher), the EMA teacher and another model as teacher (kind "model"), all kept in
step with the policy's sharding."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from rl.config import LearnerConfig
from rl.core.batch import MicroBatch
from rl.learner.model import is_diffusion, unwrap


def freeze(policy: torch.nn.Module, cfg: LearnerConfig, ds_config: dict, device: torch.device):
    """`policy` (a wrapped model) made no-grad and placed as the trained one is."""
    import deepspeed

    policy = policy.eval().requires_grad_(False)
    if cfg.zero_stage == 3:
        # Sharded like the policy, so a frozen copy costs 1/world_size of a model per rank.
        engine, *_ = deepspeed.initialize(model=policy, config=ds_config)
        return engine
    return policy.to(device)


def _full_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's value without grad; under ZeRO-3 a gathered copy (it is partitioned outside forwards)."""
    import deepspeed

    if not hasattr(param, "ds_id"):
        return param.detach()
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


class FrozenModels:
    """What scores as the policy, the reference or a teacher kind, and the EMA teacher's upkeep.

    `engine` is the policy's DeepSpeed engine; `reference` the frozen copy (None with LoRA, whose
    frozen model is the policy with adapters disabled); `ema` the EMA teacher's copy or None.
    """

    def __init__(self, engine, cfg: LearnerConfig, teacher, lora: bool, reference, ema, rank: int, device: torch.device,
                 external=None):
        # teacher: the algorithm's teacher settings (OPSD's TeacherConfig), None without a teacher.
        # external: the frozen copy of another model (teacher kind "model"), or None.
        self.engine, self.cfg, self.teacher, self.lora, self.rank, self.device = engine, cfg, teacher, lora, rank, device
        self.reference, self.ema, self.external = reference, ema, external
        self._ema_masters: dict[str, torch.Tensor] = {}

    def _scorer(self, which: str):
        """(module, context) that scores as `which`: "policy", "reference" or a teacher kind."""
        if which in ("policy", "live"):
            return self.engine, nullcontext()
        if which == "ema":
            if self.ema is None:
                raise ValueError("An ema teacher needs the learner built with teacher settings of kind ema.")
            return self.ema, nullcontext()
        if which == "model":
            if self.external is None:
                raise ValueError("A teacher of kind model needs the learner built with those teacher settings.")
            return self.external, nullcontext()
        if self.lora:
            return self.engine, self.engine.module.lm.disable_adapter()
        if self.reference is None:
            raise ValueError(
                f"Scoring with the frozen initial policy ({which}) needs the learner built with "
                "with_reference=True, or with a teacher of kind frozen."
            )
        return self.reference, nullcontext()

    @torch.no_grad()
    def score(self, which: str, mb: MicroBatch, fn=None):
        """`which`'s forward on `mb` in eval mode: hidden states, or `fn(hidden, output weight)`."""
        module, context = self._scorer(which)
        training = module.training
        module.eval()
        try:
            with context:
                return module(mb=mb, fn=fn)
        finally:
            module.train(training)

    def teacher_head_weight(self) -> torch.Tensor | None:
        """The teacher's output weight when it is another copy's (frozen, EMA or another model), else None."""
        if self.teacher is None:
            raise ValueError(
                "This batch carries a teacher view, but the learner was built without teacher settings: "
                "pass the algorithm's teacher (its Requirements.teacher) as `teacher=`."
            )
        module, _ = self._scorer(self.teacher.kind)
        if module is self.engine or is_diffusion(module):  # a diffusion model's forward gives logits
            return None
        return _full_weight(unwrap(module).output_weight)

    @torch.no_grad()
    def update_ema(self) -> None:
        """teacher <- decay * teacher + (1 - decay) * policy, over the parameters that train."""
        import deepspeed

        decay = self.teacher.ema_decay
        ema = dict(unwrap(self.ema).lm.named_parameters())
        for name, p in self.engine.module.lm.named_parameters():
            if not p.requires_grad:
                continue
            q = ema[name]
            # modifier_rank=0: on leaving, rank 0's new value is re-partitioned to all (ZeRO-3).
            with deepspeed.zero.GatheredParameters([p]), deepspeed.zero.GatheredParameters([q], modifier_rank=0):
                master = self._ema_master(name, q)
                master.lerp_(p.detach().to(master.dtype), 1.0 - decay)
                if master is not q:
                    q.copy_(master)

    def _ema_master(self, name: str, q: torch.nn.Parameter) -> torch.Tensor:
        # A bf16 average would round away updates below ~0.4% of a weight (most of them, at RL
        # learning rates), so lower-precision copies follow a float32 master (whole on every rank,
        # ZeRO-3 included: the price of an EMA of a fully trained bf16 model).
        if q.dtype == torch.float32:
            return q
        if name not in self._ema_masters:
            self._ema_masters[name] = q.detach().float().clone()
        return self._ema_masters[name]


    def _ema_moving(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The EMA teacher's parameters that follow the policy's (the trained ones); the rest stay initial."""
        ema = dict(unwrap(self.ema).lm.named_parameters())
        return [(name, ema[name]) for name, p in self.engine.module.lm.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def ema_state(self) -> dict[str, torch.Tensor]:
        """The moving EMA weights on rank 0, as their float32 masters where kept; a collective call."""
        import deepspeed

        state = {}
        for name, q in self._ema_moving():
            with deepspeed.zero.GatheredParameters([q]):
                if self.rank == 0:
                    state[name] = self._ema_masters.get(name, q.detach()).to("cpu", copy=True)
        return state

    @torch.no_grad()
    def load_ema(self, state: dict[str, torch.Tensor]) -> None:
        import deepspeed

        for name, q in self._ema_moving():
            if q.dtype != torch.float32:
                self._ema_masters[name] = state[name].float().to(self.device)
            with deepspeed.zero.GatheredParameters([q], modifier_rank=0):
                q.copy_(state[name])

