"""A LLaDA-architecture masked-diffusion LM of our own, with a block KV cache for the cached sampler.

Architecture (LLaDA-8B's "llama" block type): token embedding `wte`; per layer
    h = x + attn_out(Attention(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n))),   n = attn_norm(x)
    y = h + ff_out(silu(ff_proj(m)) * up_proj(m)),                             m = ff_norm(h)
with RMSNorm (weight only, eps `rms_norm_eps`), rotary embeddings on the two halves of each head
(`rotate_half`, angles pos * theta^(-2i/d), computed in float32 or better), bidirectional attention
(no causal mask; padding is masked out of the keys only), then `ln_f` and the output projection
`ff_out` (or the embedding matrix when `weight_tying`), no logit scaling.

Parameter names are the release's, so its state dict loads as-is (`load_state_dict(strict=True)`,
or `LLaDAForDiffusion.from_pretrained(<checkpoint dir>)`):
    model.transformer.wte.weight
    model.transformer.blocks.N.{attn_norm,ff_norm}.weight
    model.transformer.blocks.N.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out}.weight
    model.transformer.ln_f.weight
    model.transformer.ff_out.weight            (absent when weight_tying)
Checked against the LLaDA modelling code vendored by NVlabs/Fast-dLLM (commit
24cc59e75f20a6384bae8c905965bb090b96388e, llada/model/modeling_llada.py, "Modified from LLaDA
repos"; GSAI-ML/LLaDA-8B-Instruct's own modeling_llada.py is hub remote code, not in the stored
index, and Fast-dLLM loads the released weights with this file unchanged in names):
- RMSLayerNorm: lines 326-354 (float32 variance, `weight * x`, no bias when bias_for_layer_norm=False);
- RotaryEmbedding: lines 388-460 (inv_freq = 1 / theta^(arange(0, hd, 2) / hd), cat(freqs, freqs),
  rotate_half on the two halves, full precision);
- LLaDABlock: attn_out line 589, ff_out line 594; attention (no causal mask) lines 694-775;
- LLaDALlamaBlock: attn_norm/ff_norm lines 899-900, q_proj/k_proj/v_proj lines 908-916,
  ff_proj/up_proj lines 919-925, forward lines 938-989 (`act(ff_proj(x)) * up_proj(x)`);
- LLaDAModel: transformer = ModuleDict(wte, emb_drop, ln_f) + blocks + ff_out lines 1222-1256;
  padding mask on keys lines 1402-1407; ln_f and ff_out / tied logits lines 1509-1521;
- LLaDAModelLM: `self.model = LLaDAModel(...)`, base_model_prefix "model", lines 1539-1557.
Only what LLaDA-8B uses is implemented: block_type llama, layer_norm_type rms, activation silu,
rope, no biases, no alibi, no q/k norm, block_group_size 1; other settings are refused.

The cache (`forward_cached`): keys (after RoPE) and values of every layer are kept for the whole
padded width [B, W]. A full call computes every position and returns a fresh cache; a span call
computes only the given positions (each row's own [B, S] positions), writes their keys/values
into the cache in place, lets them attend to every attended position (cached or fresh), and
returns logits only at `logits_at` (indices along the computed positions), so no [B, W, V]
tensor is formed. This is Fast-dLLM's approximate cache: positions outside the span keep the
keys/values of the last full call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel


class LLaDAConfig(PretrainedConfig):
    """The release's config.json fields that the architecture reads (same names). Defaults are a
    small random model; LLaDA-8B-Instruct's config.json sets d_model 4096, n_heads 32,
    n_kv_heads 32, n_layers 32, mlp_hidden_size 12288, vocab_size = embedding_size 126464,
    rope_theta 500000, weight_tying false, mask_token_id 126336 (read them from the checkpoint)."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 64,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        n_layers: int = 2,
        mlp_hidden_size: int | None = None,
        mlp_ratio: int = 4,
        vocab_size: int = 50,
        embedding_size: int | None = None,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_sequence_length: int = 4096,
        weight_tying: bool = False,
        mask_token_id: int | None = None,
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        activation_type: str = "silu",
        rope: bool = True,
        alibi: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        bias_for_layer_norm: bool | None = False,
        attention_layer_norm: bool = False,
        scale_logits: bool = False,
        input_emb_norm: bool = False,
        block_group_size: int = 1,
        **kwargs,
    ):
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_hidden_size, self.mlp_ratio = mlp_hidden_size, mlp_ratio
        self.vocab_size, self.embedding_size = vocab_size, embedding_size
        self.rms_norm_eps, self.rope_theta, self.max_sequence_length = rms_norm_eps, rope_theta, max_sequence_length
        self.weight_tying, self.mask_token_id = weight_tying, mask_token_id
        self.block_type, self.layer_norm_type, self.activation_type = block_type, layer_norm_type, activation_type
        self.rope, self.alibi, self.include_bias, self.include_qkv_bias = rope, alibi, include_bias, include_qkv_bias
        self.bias_for_layer_norm, self.attention_layer_norm = bias_for_layer_norm, attention_layer_norm
        self.scale_logits, self.input_emb_norm, self.block_group_size = scale_logits, input_emb_norm, block_group_size
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def check(self) -> None:
        unsupported = {
            "block_type": (self.block_type, "llama"), "layer_norm_type": (self.layer_norm_type, "rms"),
            "activation_type": (self.activation_type, "silu"), "rope": (self.rope, True), "alibi": (self.alibi, False),
            "include_bias": (self.include_bias, False), "include_qkv_bias": (self.include_qkv_bias, False),
            "attention_layer_norm": (self.attention_layer_norm, False), "scale_logits": (self.scale_logits, False),
            "input_emb_norm": (self.input_emb_norm, False), "block_group_size": (self.block_group_size, 1),
        }
        bad = {k: v for k, (v, want) in unsupported.items() if v != want}
        if self.bias_for_layer_norm:
            bad["bias_for_layer_norm"] = True
        if bad:
            raise ValueError(f"rollouts.llada_model implements LLaDA-8B's architecture only; unsupported settings: {bad}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}).")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_hidden(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model


@dataclass
class KVCache:
    """Per layer keys (RoPE applied) and values, [B, W, kv_heads, head_dim], for every position."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def width(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class CachedOutput:
    logits: torch.Tensor  # [B, P, V] at the requested positions
    cache: KVCache | None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The release normalises in float32 and casts back; float64 inputs stay float64.
        work = x if x.dtype == torch.float64 else x.float()
        work = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * work.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, S] -> (cos, sin) [B, S, 1, head_dim] in float32 or float64."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=work) / head_dim))
    angles = positions.to(work)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, hd]: x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a) over the two halves."""
    work = x.to(cos.dtype)
    half = work.shape[-1] // 2
    rotated = torch.cat((-work[..., half:], work[..., :half]), dim=-1)
    return (work * cos + rotated * sin).to(x.dtype)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        d, kv = config.d_model, config.kv_heads * config.head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.ff_hidden, bias=False)
        self.up_proj = nn.Linear(d, config.ff_hidden, bias=False)
        self.ff_out = nn.Linear(config.ff_hidden, d, bias=False)

    def forward(self, x, cos, sin, key_mask, layer_keys=None, layer_values=None, span=None, keep=None):
        """x [B, S, d] at the computed positions. layer_keys/values [B, W, kvh, hd]: the cache to
        write the fresh keys/values into at `span` [B, S] (None with span None: S = W, the
        fresh ones are the cache). keep [B, P]: indices along S whose outputs are needed (the
        last layer computes queries and the MLP only there). Returns (x, keys, values)."""
        c = self.config
        B, S, _ = x.shape
        n = self.attn_norm(x)
        k = apply_rope(self.k_proj(n).view(B, S, c.kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(n).view(B, S, c.kv_heads, c.head_dim)
        if span is None:
            keys, values = k, v
        else:
            rows = torch.arange(B, device=x.device)[:, None]
            layer_keys[rows, span] = k.to(layer_keys.dtype)
            layer_values[rows, span] = v.to(layer_values.dtype)
            keys, values = layer_keys, layer_values
        if keep is not None:
            rows = torch.arange(B, device=x.device)[:, None]
            x, n, cos, sin = x[rows, keep], n[rows, keep], cos[rows, keep], sin[rows, keep]
        q = apply_rope(self.q_proj(n).view(B, n.shape[1], c.n_heads, c.head_dim), cos, sin)
        groups = c.n_heads // c.kv_heads
        kh, vh = keys.transpose(1, 2), values.transpose(1, 2)
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), kh.to(q.dtype), vh.to(q.dtype), attn_mask=key_mask)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, -1, c.d_model))
        m = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))
        return x, k, v


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        config.check()
        self.config = config
        vocab = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, config.d_model), ln_f=RMSNorm(config.d_model, config.rms_norm_eps)))
        self.transformer.update({"blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers))})
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(config.d_model, vocab, bias=False)})

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer.ln_f(x)
        weight = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(x, weight)


class LLaDAForDiffusion(PreTrainedModel):
    """`model(input_ids, attention_mask).logits` [B, W, V] (the plain sampler's and the learner's
    call), and `forward_cached` for the cached sampler."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @property
    def mask_token_id(self) -> int | None:
        return self.config.mask_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        from transformers.modeling_outputs import MaskedLMOutput

        return MaskedLMOutput(logits=self.forward_cached(input_ids, attention_mask, use_cache=False).logits)

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        span: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> CachedOutput:
        """input_ids [B, W] (the whole padded rows), attention_mask [B, W] (1 = attended).

        span None: every position is computed; the cache returned (use_cache) holds all of them.
        span [B, S] (positions of each row): only those are computed; their keys/values are
        written into `cache` in place and they attend to every attended position.
        logits_at [B, P]: indices along the computed positions (0..S-1, or 0..W-1 without a span)
        where logits are returned; None: all computed positions."""
        t = self.model.transformer
        B, W = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones((B, W), dtype=torch.long, device=device)
        key_mask = attention_mask.bool()[:, None, None, :]
        rows = torch.arange(B, device=device)[:, None]
        if span is None:
            positions = torch.arange(W, device=device).expand(B, W)
            tokens = input_ids
        else:
            if cache is None or cache.width != W:
                raise ValueError("A span forward needs the cache of a full forward over the same width.")
            positions = span
            tokens = input_ids[rows, span]
        x = t.wte(tokens)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        keys, values = [], []
        last = len(t.blocks) - 1
        for i, block in enumerate(t.blocks):
            keep = logits_at if i == last else None
            x, k, v = block(
                x, cos, sin, key_mask,
                layer_keys=None if span is None else cache.keys[i],
                layer_values=None if span is None else cache.values[i],
                span=span, keep=keep,
            )
            if span is None and use_cache:
                keys.append(k)
                values.append(v)
        logits = self.model.head(x)
        if span is None:
            return CachedOutput(logits, KVCache(keys, values) if use_cache else None)
        return CachedOutput(logits, cache)


# A checkpoint of model_type "llada" without remote code (one saved from this module, e.g. the tiny
# built model tiny-llada-chain-addition) loads as this class through AutoModelForMaskedLM. The
# release's checkpoints carry remote code: with trust_remote_code they still load theirs.
AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAConfig, LLaDAForDiffusion, exist_ok=True)


def supports_cache(model) -> bool:
    """True for models offering `forward_cached` (this module's LLaDA)."""
    return callable(getattr(model, "forward_cached", None))


def is_llada_checkpoint(model_path: str) -> bool:
    """Whether the checkpoint's config.json names the LLaDA architecture (model_type "llada", as the
    release's and this module's do), read without running the checkpoint's remote code."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model_path)
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "llada"
