"""IGPO at reveal fractions 0 is the IGPO release's "inpainting ratio = 0" baseline
(run_igpo.sh:6-7): an all-wrong group is sampled again once with G answers and no hint, and up to
lambda x G correct ones replace wrong answers. The recipes: igpo_ratio0_llada and d1's diffu_grpo_llada."""
import random

from rl.algorithms.inpainting import HintSettings, build_hints
from rl.config import load_config
from tests.unit.test_igpo import G, completion, igpo, sampled_round


def test_zero_reveal_means_no_hints_in_both_hint_variants():
    trace = list(range(100, 160))
    for released in (False, True):
        settings = HintSettings(reveal_min=0.0, reveal_max=0.0, released_variant=released, chunk_min=2, chunk_max=3, free_tail=4)
        assert build_hints(trace, 40, 8, random.Random(0), settings) == [{}] * 8
    # The released variant otherwise always reveals the last chunk, even at a tiny fraction.
    tiny = HintSettings(reveal_min=0.0, reveal_max=1e-9, released_variant=True, chunk_min=2, chunk_max=3, free_tail=4)
    assert all(build_hints(trace, 40, 8, random.Random(0), tiny))


class PlainLoop:
    """Unhinted resamples; sample k of each call is correct when k is odd."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, spec, hints):
        self.calls.append((prompts, spec, hints))
        return [[completion([70 + k, 71])] for k in range(len(prompts))]

    def score(self, completions, rows):
        correct = [c.token_ids[0] % 2 == 1 for c in completions]
        return [3.0 if ok else 0.0 for ok in correct], correct


def test_ratio0_resamples_all_wrong_groups_plainly_without_a_reference():
    algorithm = igpo("igpo.reveal_min=0", "igpo.reveal_max=0", "igpo.replace_fraction=0.5")
    sampled = sampled_round([[False] * G, [True] + [False] * (G - 1)])
    sampled.rows[0].pop("solution")  # no reference reasoning is needed without hints
    loop = PlainLoop()
    repair = algorithm.repair_groups(sampled, loop.generate, loop.score)
    (prompts, spec, hints), = loop.calls
    assert len(prompts) == G and hints == [{}] * G and spec.n == 1  # G fresh answers, no hint
    assert repair.counts["no_reference"] == 0 and repair.counts["inpainted"] == G
    # 4 of the 8 resamples are correct (odd k), lambda x G = 4 of them replace the first slots.
    group = repair.sampled.completions[0]
    assert [c.token_ids[0] for c in group[:4]] == [71, 73, 75, 77]
    assert group[4:] == sampled.completions[0][4:]
    assert repair.sampled.correct[0] == [True] * 4 + [False] * 4
    assert repair.sampled.completions[1] == sampled.completions[1]  # a group with signal is left alone


def test_the_llada_recipes_are_named_for_what_they_are():
    igpo_cfg, ratio0, d1 = (load_config(n) for n in ("igpo_llada", "igpo_ratio0_llada", "diffu_grpo_llada"))
    assert (ratio0.algorithm, ratio0.igpo.reveal_min, ratio0.igpo.reveal_max) == ("igpo", 0.0, 0.0)
    # Everything else is igpo_llada's.
    assert ratio0.igpo.model_copy(update={"reveal_min": 0.2, "reveal_max": 0.6}) == igpo_cfg.igpo
    same = lambda cfg: {k: v for k, v in cfg.model_dump().items() if k not in ("igpo", "recipe")}
    assert same(ratio0) == same(igpo_cfg)
    assert (igpo_cfg.igpo.loss_support, igpo_cfg.igpo.loss_agg) == ("whole_answer", "group_token_mean")
    assert d1.algorithm == "diffu_grpo" and d1.data.train == "gsm8k"
    assert (d1.diffu_grpo.loss_support, d1.diffu_grpo.loss_agg) == ("through_eos", "group_token_mean")
    assert [f.name for f in d1.reward.functions] == ["d1_xmlcount", "d1_soft_format", "d1_strict_format", "d1_int", "d1_correctness"]
