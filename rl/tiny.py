"""Tiny local models and a synthetic addition task: offline stand-ins for tests and demos.

Everything here is built on the machine (no hub): a byte-level BPE tokenizer trained on a small
corpus, a randomly initialised transformers model (Qwen3 with tied embeddings or Llama without),
and a short supervised warm-up that gives the model partial accuracy on `a+b=` so that RL has a
signal to amplify.
"""
from __future__ import annotations

import random
from pathlib import Path

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


def build_tokenizer(out_dir: str | Path, vocab_size: int = 320):
    """Train a byte-level BPE tokenizer locally and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{r['question']}{r['answer']}" for r in addition_rows(2000, seed=123, max_operand=99)]
    corpus += ["The answer is \\boxed{12}. Let us think step by step about the question."] * 20
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


def warm_up_partial(model_dir: str | Path, steps: int = 130, lr: float = 3e-3, seed: int = 0):
    """A short supervised warm-up on `a+b=`, stopped early so that the model is only partly right.

    Measured (hidden 64, 2 layers, lr 3e-3): mean p(correct answer) about 0.21 after 100 steps,
    0.36 after 160, 0.72 after 300. Partial accuracy is the regime where group-relative
    RL has something to amplify.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = addition_rows(32 * steps, seed=seed + 1)
    model.train()
    for step in range(steps):
        ids, labels = [], []
        for r in rows[step * 32 : (step + 1) * 32]:
            p = tok(r["question"], add_special_tokens=False)["input_ids"]
            c = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        label_t = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        attn = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        model(input_ids=input_ids, attention_mask=attn, labels=label_t).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(model_dir)
    return model_dir


def addition_task(root: str | Path, warmup_steps: int, n_rows: int, seed: int = 5) -> tuple[Path, Path]:
    """A warmed-up tiny Qwen3 in root/model and `a+b=` training rows in root/train.jsonl."""
    import json

    root = Path(root)
    model = build_model(root / "model", arch="qwen3", tied=True)
    warm_up_partial(model, steps=warmup_steps)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(n_rows, seed=seed)))
    return model, data
