"""Tiny local models and a synthetic addition task: offline stand-ins for tests and demos.

A plug-in, not part of the library's import path: importing it registers the data source
`synthetic:<task>` (rl.data.register_data_source) and the built models `tiny-dllm-chain-addition`,
`tiny-qwen3-addition` and `tiny-qwen3-addition-sft` (rl.models.register_model_builder). A config
names it in `plugins: [rl.demo.tiny]` (recipes igpo_tiny and opd_tiny do); tests and scripts import
its builders directly.

Everything here is built on the machine (no hub): a byte-level BPE tokenizer trained on a small
corpus, a randomly initialised transformers model (Qwen3 with tied embeddings or Llama without),
and a short supervised warm-up that gives the model partial accuracy on `a+b=` so that RL has a
signal to amplify. The masked-diffusion counterpart: a tiny bidirectional BERT warmed up with the
masked-diffusion SFT loss on chains like `7-3+5-2=` whose solutions are step-by-step traces
(the reference reasoning IGPO inpaints).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

from rl.data import DataError, register_data_source
from rl.models import register_model_builder

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


def addition_rows(n: int, seed: int = 0, max_operand: int = 9) -> list[dict]:
    """Rows {question, answer} for `a+b=` with single-digit operands (GSM8K-like column names)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"question": f"{a}+{b}=", "answer": str(a + b)})
    return rows


def build_tokenizer(out_dir: str | Path, vocab_size: int = 320, extra_corpus: Iterable[str] = ()):
    """Train a byte-level BPE tokenizer locally and save it as a transformers fast tokenizer.

    extra_corpus: more training texts, so that a task's recurring strings (`####`) become single
    tokens; the default corpus is the addition task's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{r['question']}{r['answer']}" for r in addition_rows(2000, seed=123, max_operand=99)]
    corpus += ["The answer is \\boxed{12}. Let us think step by step about the question."] * 20
    corpus += list(extra_corpus)
    tok = Tokenizer(models.BPE())
    # Digits are split one by one so that numbers share a small, well-trained vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<|mask|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    tied: bool = True,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
):
    """A random tiny causal LM saved as an HF folder that vLLM and DeepSpeed both load.

    Head size is 32: vLLM's CPU attention rejects 16.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    config = Qwen3Config(**common) if arch == "qwen3" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    return out_dir


def supervised_warm_up(model_dir: str | Path, batch: Callable, steps: int, lr: float = 3e-3, seed: int = 0):
    """`steps` AdamW steps of next-token loss on completion tokens only, saved back to model_dir.

    batch(tokenizer, step) -> that step's (prompt ids, completion ids) pairs.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        pairs = batch(tok, step)
        ids = [p + c for p, c in pairs]
        labels = [[-100] * len(p) + c for p, c in pairs]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        label_t = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        attn = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        model(input_ids=input_ids, attention_mask=attn, labels=label_t).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


def warm_up_partial(model_dir: str | Path, steps: int = 130, lr: float = 3e-3, seed: int = 0):
    """A short supervised warm-up on `a+b=`, stopped early so that the model is only partly right.

    Measured (hidden 64, 2 layers, lr 3e-3): mean p(correct answer) about 0.21 after 100 steps,
    0.36 after 160, 0.72 after 300. Partial accuracy is the regime where group-relative
    RL has something to amplify.
    """
    rows = addition_rows(32 * steps, seed=seed + 1)

    def batch(tok, step):
        return [
            (tok(r["question"], add_special_tokens=False)["input_ids"],
             tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            for r in rows[step * 32 : (step + 1) * 32]
        ]

    return supervised_warm_up(model_dir, batch, steps, lr, seed)


def addition_task(root: str | Path, warmup_steps: int, n_rows: int, seed: int = 5) -> tuple[Path, Path]:
    """A warmed-up tiny Qwen3 in root/model and `a+b=` training rows in root/train.jsonl."""
    import json

    root = Path(root)
    model = build_model(root / "model", arch="qwen3", tied=True)
    warm_up_partial(model, steps=warmup_steps)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(n_rows, seed=seed)))
    return model, data


def chain_addition_rows(n: int, seed: int = 0, operands: int = 4, max_value: int = 9) -> list[dict]:
    """Rows {question, solution, answer} for chains like `7-3+5-2=`, solved left to right.

    e.g. {"question": "7-3+5-2=", "solution": "7-3=4 4+5=9 9-2=7", "answer": "7"}. Every operand
    and every partial result stays in 0..max_value, so each step of the trace is one fact from
    the same small table of single-digit additions and subtractions: a partly trained model knows
    some facts and not others, and a chain fails when any of its steps does. The trace is the
    reference reasoning IGPO inpaints: a revealed step is one fact the model no longer needs,
    while the last step (the answer, which hints leave out) is a fact of the same table, which is
    what lets hints rescue failing groups. `solution` and `answer` are the columns
    rl.data.normalize_row keeps.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = rng.randint(0, max_value)
        question, steps = str(total), []
        for _ in range(operands - 1):
            signs = []
            while not signs:  # e.g. 4 and 7: neither sum nor difference stays in range; draw again
                term = rng.randint(0, max_value)
                signs = [sign for sign, ok in (("+", total + term <= max_value), ("-", total - term >= 0)) if ok]
            sign = rng.choice(signs)
            result = total + term if sign == "+" else total - term
            steps.append(f"{total}{sign}{term}={result}")
            question += f"{sign}{term}"
            total = result
        rows.append({"question": question + "=", "solution": " ".join(steps), "answer": str(total)})
    return rows


def reasoning_completion(row: dict) -> str:
    """The completion a model is trained to write: the row's trace, then `#### answer`.

    `#### N` is what rewards.math.final_answer reads when there is no \\boxed{}; it is shorter
    than a box, which matters with a fixed answer length of a couple of dozen tokens.
    """
    return f"{row['solution']} #### {row['answer']}"


def build_diffusion_model(out_dir: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0, arch: str = "bert") -> Path:
    """A random tiny bidirectional transformer saved with its tokenizer: BertForMaskedLM, or with
    arch "llada" our LLaDA-architecture model (rollouts.llada_model, which the cached sampler can
    cache; RMSNorm, RoPE, SwiGLU, no dropout).

    It maps token ids to per-position logits over the vocabulary: a masked diffusion LM's shape
    (AutoModelForMaskedLM loads it). Dropout is off so that the sampler, the learner and the
    log-probability checks all see the same deterministic function. The tokenizer's corpus
    includes chain-addition texts so that `####` is one token.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out_dir = Path(out_dir)
    task_texts = [r["question"] + reasoning_completion(r) for r in chain_addition_rows(500, seed=123)]
    tokenizer = build_tokenizer(out_dir, extra_corpus=task_texts)
    if arch == "llada":
        from rollouts.llada_model import LLaDAConfig, LLaDAForDiffusion

        torch.manual_seed(seed)
        config = LLaDAConfig(d_model=hidden, n_heads=max(1, hidden // 32), n_layers=layers, vocab_size=len(tokenizer),
                             max_sequence_length=512, mask_token_id=tokenizer.mask_token_id,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        LLaDAForDiffusion(config).save_pretrained(str(out_dir))
        return out_dir
    if arch != "bert":
        raise ValueError(f"arch must be bert or llada, not {arch!r}.")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=hidden * 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=512,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(str(out_dir))
    return out_dir


def warm_up_diffusion(
    model_dir: str | Path, rows: list[dict], steps: int, lr: float = 1e-3, answer_length: int = 24, seed: int = 0,
    batch_size: int = 32, prompt_of: Callable[[dict], str] = lambda row: row["question"],
) -> Path:
    """Masked-diffusion SFT (rl.demo.diffusion_sft) on `rows`' reasoning completions after
    `prompt_of(row)` (the question by default); saves the model back.

    Rows are taken in order, `batch_size` a step, cycling when they run out. Like warm_up_partial
    it is meant to be stopped early, leaving a partly right model for RL to improve. Measured on
    four-operand chains (hidden 64, 2 layers, lr 1e-3, answer_length 24; sampled with block 8,
    12 steps, temperature 1, groups of 8): after 1500 steps accuracy 0.28 with 27% of groups all
    wrong, after 2000 steps 0.30-0.33 with 28-31% all wrong, after 4000 steps 0.44 with 21%.
    lr 3e-3 stayed near chance (0.12) after 2000 steps.
    """
    import torch
    from transformers import AutoTokenizer

    from rl.demo.diffusion_sft import mask_answers, masked_diffusion_sft_loss, sft_batch
    from rollouts.diffusion import load_masked_diffusion_model

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_masked_diffusion_model(str(model_dir), torch.float32)
    torch.manual_seed(seed)
    noise = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    prompts = [tok(prompt_of(r), add_special_tokens=False)["input_ids"] for r in rows]
    answers = [tok(reasoning_completion(r), add_special_tokens=False)["input_ids"] for r in rows]
    model.train()
    for step in range(steps):
        idx = [(step * batch_size + j) % len(rows) for j in range(batch_size)]
        batch = sft_batch(
            [prompts[i] for i in idx], [answers[i] for i in idx],
            answer_length=answer_length, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        )
        noisy, masked, t = mask_answers(batch.input_ids, batch.prompt_lens, batch.answer_lens, tok.mask_token_id, noise)
        logits = model(input_ids=noisy, attention_mask=batch.attention_mask).logits
        masked_diffusion_sft_loss(logits, batch.input_ids, masked, t, batch.answer_lens).backward()
        # A row with a tiny t weighs its few masked tokens by up to 1/eps: clipping tames those
        # batches. Measured (lr 1e-3): smoothed loss 0.12 after 2000 steps with it, 0.18 without.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(model_dir))
    return model_dir


def diffusion_task(root: str | Path, warmup_steps: int, n_rows: int, seed: int = 5) -> tuple[Path, Path]:
    """A warmed-up tiny diffusion LM in root/model and chain-addition rows in root/train.jsonl.

    warmup_steps 2000 (about a minute on one CPU thread) gives the partly right model IGPO needs:
    about 30% of groups of 8 all wrong, and IGPO's hints (chunks of the trace without its final
    answer) raise sample accuracy from 0.30 to 0.57 and give at least one correct sample in about
    two thirds of the all-wrong groups.
    """
    import json

    root = Path(root)
    model = build_diffusion_model(root / "model")
    warm_up_diffusion(model, chain_addition_rows(32 * warmup_steps, seed=seed + 1), steps=warmup_steps)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chain_addition_rows(n_rows, seed=seed)))
    return model, data


TINY_DLLM_WARMUP_STEPS = 2000  # the calibration in diffusion_task's docstring


def build_tiny_dllm(out_dir: str | Path, seed: int = 0) -> Path:
    """The built model `tiny-dllm-chain-addition` (registered below): build_diffusion_model warmed
    up for TINY_DLLM_WARMUP_STEPS on chain-arithmetic rows, about a minute on one CPU thread."""
    model = build_diffusion_model(out_dir, seed=seed)
    return warm_up_diffusion(model, chain_addition_rows(32 * TINY_DLLM_WARMUP_STEPS, seed=seed + 1), TINY_DLLM_WARMUP_STEPS)


def build_tiny_llada(out_dir: str | Path, seed: int = 0) -> Path:
    """The built model `tiny-llada-chain-addition`: build_tiny_dllm's recipe on the LLaDA architecture
    (rollouts.llada_model), so that the cached sampler (prefix, dual) runs on the tiny task
    (scripts/experiment_fast_sampler.py). Measured: greedy accuracy 0.72 on 256 held-out chains
    after the same 2000 steps (BERT's: 0.39)."""
    model = build_diffusion_model(out_dir, seed=seed, arch="llada")
    return warm_up_diffusion(model, chain_addition_rows(32 * TINY_DLLM_WARMUP_STEPS, seed=seed + 1), TINY_DLLM_WARMUP_STEPS)


# OPSD for a diffusion student (recipe opsd_tiny_dllm): a teacher that reads the reference solution.
# The teacher's view is `{problem} {solution}` (the recipe's opsd.teacher_template). The built student
# cannot use it: greedy accuracy 0.39 on its own prompt, 0.00 shown that view (256 held-out chains).
# The teacher is the student after TINY_DLLM_READER_STEPS more masked-diffusion SFT steps on the
# view: 1.00 shown it, 0.02 on the plain prompt (built in 52 s on a 2-core EPYC).
TINY_DLLM_READER_STEPS = 1000


def teacher_view(row: dict) -> str:
    """The privileged view the reader is trained on; recipes/opsd_tiny_dllm.yaml's teacher_template."""
    return f"{row['question']} {row['solution']}"


def build_tiny_dllm_reader(out_dir: str | Path) -> Path:
    """The built model `tiny-dllm-chain-addition-reader`: `tiny-dllm-chain-addition` trained to copy
    the reference trace it is shown (its own draw of chains, seed 17)."""
    import shutil

    from rl.models import resolve_model_path

    shutil.copytree(resolve_model_path("tiny-dllm-chain-addition"), out_dir)
    rows = chain_addition_rows(32 * TINY_DLLM_READER_STEPS, seed=17)
    return warm_up_diffusion(out_dir, rows, TINY_DLLM_READER_STEPS, prompt_of=teacher_view)


# The addition task with a held-out split, for distillation against RL (scripts/experiment_opd.py,
# recipe opd_tiny): the 100 single-digit pairs shuffled once; ADDITION_HELDOUT_PAIRS of them are
# never trained on, by RL or by the SFT teacher.
ADDITION_HELDOUT_PAIRS = 50
ADDITION_TEACHER_SFT_STEPS = 60


def addition_pair_split(seed: int = 11) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs) of the 100 single-digit pairs."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    return pairs[ADDITION_HELDOUT_PAIRS:], pairs[:ADDITION_HELDOUT_PAIRS]


def addition_pair_rows(pairs, n: int | None = None, seed: int = 5) -> list[dict]:
    """Rows {question, answer, solution = `a+b=c`}: each pair once, or n drawn with replacement."""
    if n is not None:
        rng = random.Random(seed)
        pairs = [rng.choice(pairs) for _ in range(n)]
    return [{"question": f"{a}+{b}=", "answer": str(a + b), "solution": f"{a}+{b}={a + b}"} for a, b in pairs]


def build_tiny_qwen3_addition(out_dir: str | Path) -> Path:
    """The built model `tiny-qwen3-addition`: the tiny Qwen3 warmed up on `a+b=` to partial accuracy."""
    build_model(out_dir, arch="qwen3", tied=True, seed=0)
    return Path(warm_up_partial(out_dir, steps=130, seed=0))


def build_tiny_qwen3_addition_sft(out_dir: str | Path) -> Path:
    """The built model `tiny-qwen3-addition-sft`: `tiny-qwen3-addition` after `python -m rl.sft` on
    the training pairs (prompt `a+b=`, target the answer), a teacher that never saw a held-out pair."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    from rl.models import resolve_model_path

    student = resolve_model_path("tiny-qwen3-addition")
    train_pairs, _ = addition_pair_split()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sft.jsonl"
        rows = [{**r, "solution": r["answer"]} for r in addition_pair_rows(train_pairs, n=64 * ADDITION_TEACHER_SFT_STEPS)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, "-m", "rl.sft", f"model.path={student}", f"data.train={data}", "data.prompt_format=plain",
               "data.max_prompt_tokens=16", f"train.steps={ADDITION_TEACHER_SFT_STEPS}", "train.prompts_per_step=64",
               "learner.micro_batch_size=64", "learner.lr=3e-3", "learner.max_grad_norm=1.0",
               "learner.gradient_checkpointing=false", "sft.max_length=32", f"tracking.output_dir={tmp}",
               "tracking.run_name=sft"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building tiny-qwen3-addition-sft: rl.sft failed:\n{proc.stderr[-2000:]}")
        shutil.copytree(Path(tmp) / "sft" / "final", out_dir)
    return Path(out_dir)


# Offline datasets by name (`data.train=synthetic:<name>`, `eval.benchmarks=[synthetic:<name>]`):
# name -> split -> rows. Evaluation reads the `test` split.
SYNTHETIC: dict[str, dict[str, Callable[[], list[dict]]]] = {
    "chain_addition": {"train": lambda: chain_addition_rows(5000, seed=5), "test": lambda: chain_addition_rows(500, seed=99)},
    "addition_pairs": {"train": lambda: addition_pair_rows(addition_pair_split()[0], n=2000),
                       "test": lambda: addition_pair_rows(addition_pair_split()[1])},
    # the training pairs, each once: the in-distribution evaluation set
    "addition_train_pairs": {"test": lambda: addition_pair_rows(addition_pair_split()[0])},
}


def synthetic_rows(name: str, split: str) -> list[dict]:
    if name not in SYNTHETIC:
        raise DataError(f"Unknown synthetic dataset {name!r}; available: {', '.join(sorted(SYNTHETIC))}.")
    if split not in SYNTHETIC[name]:
        raise DataError(f"synthetic:{name} has splits {', '.join(SYNTHETIC[name])}, not {split!r}; set data.split.")
    return SYNTHETIC[name][split]()


register_data_source("synthetic", synthetic_rows)
register_model_builder("tiny-dllm-chain-addition", build_tiny_dllm, version=1)
register_model_builder("tiny-dllm-chain-addition-reader", build_tiny_dllm_reader, version=1)
register_model_builder("tiny-llada-chain-addition", build_tiny_llada, version=1)
register_model_builder("tiny-qwen3-addition", build_tiny_qwen3_addition, version=1)
register_model_builder("tiny-qwen3-addition-sft", build_tiny_qwen3_addition_sft, version=1)
