"""A decoder-only transformer in the Llama family, in one file.

    tokens → embed_tokens → N × Block → norm → lm_head → logits
    Block:  x + Attention(RMSNorm(x)),  then  x + SwiGLU(RMSNorm(x))

- RMSNorm instead of LayerNorm (no mean subtraction, no bias).
- Rotary position embeddings in the Hugging Face `rotate_half` convention (the two halves of each head
  dimension form the rotated pairs), so a Hugging Face / GGUF export is a rename plus, for GGUF, a
  known row permutation; optionally with Llama 3.1's frequency scaling (for imported checkpoints).
- Grouped-query attention: `n_kv_head` key/value heads shared by `n_head` query heads, computed by
  `torch.nn.functional.scaled_dot_product_attention` (causal).
- SwiGLU feed-forward: down(silu(gate(x)) * up(x)).
- Optional tied input/output embeddings; no biases, except on the query/key/value projections where a
  family has them (`qkv_bias`, Qwen2); optionally an RMSNorm over each query and key head (`qk_norm`, Qwen3).
- A key/value cache for generation: each layer keeps the keys and values of the tokens seen so far.

Module names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers.N.self_attn.q_proj, ...),
without its "model." prefix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmpipe.config.params import check_settings, params_section, setting
from llmpipe.model.loss import (  # noqa: F401 (IGNORE_INDEX: the targets' convention, imported from here)
    IGNORE_INDEX,
    chunked_cross_entropy,
    full_logits_cross_entropy,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the Hugging Face model_types this layout covers


@params_section("model", presets=True)
@dataclass
class ModelConfig:
    vocab_size: int = setting(doc="tokens; null = the trained tokenizer's vocabulary size", min=1)
    context_length: int = setting(doc="positions the model is trained on", min=1)
    n_layer: int = setting(doc="transformer blocks", min=1)
    d_model: int = setting(doc="width of the residual stream", min=1)
    n_head: int = setting(doc="query heads", min=1)
    n_kv_head: int = setting(doc="key/value heads (grouped-query attention when fewer than n_head)", min=1)
    ffn_hidden: int = setting(doc="inner width of the SwiGLU feed-forward", min=1)
    head_dim: int | None = setting(None, "per-head width; null = d_model / n_head", min=2)
    rope_theta: float = setting(10000.0, "base of the rotary position frequencies", above=0)
    rms_norm_eps: float = setting(1e-5, "epsilon inside RMSNorm", above=0)
    tie_embeddings: bool = setting(True, "share the embedding matrix with the output head")
    rope_scaling: dict | None = None  # Llama 3.1 rotary scaling: factor, low_freq_factor, high_freq_factor,
    #                                   original_max_position_embeddings (imported checkpoints only; not a param)
    # What some imported families add to this Llama layout (not params; to_dict leaves them out at their defaults):
    qkv_bias: bool = False    # biases on the query, key and value projections (Qwen2)
    qk_norm: bool = False     # RMSNorm over each query and key head before the rotation (Qwen3)
    family: str = "llama"     # the Hugging Face model_type the weights came from, which the exports write back

    def __post_init__(self):
        check_settings(self)  # typed and ranged whatever the source: params.yaml, config.json, a checkpoint, GGUF
        problems = []
        if self.head_dim is None:
            if self.n_head > 0 and self.d_model % self.n_head:
                problems.append(f"d_model ({self.d_model}) is not a multiple of n_head ({self.n_head}): choose "
                                "n_head among its divisors, or set head_dim explicitly")
            self.head_dim = self.d_model // max(self.n_head, 1)
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        values = asdict(self)
        for name, default in IMPORTED_ONLY_DEFAULTS.items():
            if values[name] == default:
                values.pop(name)
        return values


IMPORTED_ONLY_DEFAULTS = {"rope_scaling": None, "qkv_bias": False, "qk_norm": False, "family": "llama"}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The inverse frequency of each rotated pair. Llama 3.1's scaling divides the low frequencies (wavelengths
    longer than the original context / low_freq_factor) by `factor`, keeps the high ones, and blends between."""
    inverse_frequency = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if not scaling:
        return inverse_frequency
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inverse_frequency
    scaled = torch.where(wavelength > original / low, inverse_frequency / factor, inverse_frequency)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(middle, blended, scaled)


def rotary_tables(head_dim: int, length: int, theta: float, device=None,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position × frequency, shape (length, head_dim), halves repeated (rotate_half)."""
    inverse_frequency = rotary_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inverse_frequency)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, time, head_dim) by the position angles (time, head_dim)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens processed so far, preallocated to `max_length`.
    `valid` (batch, max_length), when set, marks the positions that are real tokens: rows of left-padded
    prompts have pads first, which no token attends to."""

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device, dtype):
        shape = (batch_size, config.n_kv_head, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens stored (the position of the next token)
        self.max_length = max_length
        self.valid: torch.Tensor | None = None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of `layer` after the cached ones; return all of them."""
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def padded_attention_mask(valid: torch.Tensor, past: int, time: int) -> torch.Tensor:
    """(batch, 1, time, keys) boolean mask for `time` new tokens after `past` cached ones, in rows whose pads
    (`valid` false) no token attends to: causal, real keys only, and each position itself (so a pad's own row
    is never empty). Rotary angles depend on distances only, so a left-padded prompt's tokens attend to each
    other as they would unpadded."""
    keys = valid.shape[1]
    query_positions = torch.arange(past, past + time, device=valid.device)[:, None]
    key_positions = torch.arange(keys, device=valid.device)[None, :]
    mask = (key_positions <= query_positions) & valid[:, None, :]
    return (mask | (key_positions == query_positions))[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, cache: KVCache | None = None, return_weights: bool = False):
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)  # per head (qk_norm), before the rotation
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_index, k, v)
        if cache is not None and cache.valid is not None:  # left-padded prompts
            mask, causal = padded_attention_mask(cache.valid[:, :past + time], past, time), False
        elif past == 0:
            mask, causal = None, True            # plain causal attention over the new tokens
        elif time == 1:
            mask, causal = None, False           # one new token attends to everything cached
        else:                                    # several new tokens after a cached prefix
            mask = torch.ones(time, past + time, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        if return_weights:
            return self._explicit_attention(q, k, v, batch, time)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(out.transpose(1, 2).reshape(batch, time, -1))

    def _explicit_attention(self, q, k, v, batch, time):
        """The same attention written out, also returning the weights (for attention heatmaps)."""
        repeat = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        future = torch.ones(time, k.shape[2], dtype=torch.bool, device=q.device).triu(1 + k.shape[2] - time)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, time, -1)
        return self.o_proj(out), weights


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.full_logits_loss = False  # True: the loss from all logits at once (the reference; benchmarks)
        # Computed on the CPU and moved: on the meta device (empty_model) arange loads PyTorch's symbolic shapes, ~1 s.
        cos, sin = rotary_tables(config.head_dim, config.context_length, config.rope_theta, device="cpu",
                                 scaling=config.rope_scaling)
        self.register_buffer("rope_cos", cos.to(self.embed_tokens.weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(self.embed_tokens.weight.device), persistent=False)
        self.apply(self._init_weights)
        # Scale the projections that write into the residual stream by depth (GPT-2 / nanoGPT).
        for name, parameter in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _rotary(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if end > self.rope_cos.shape[0]:  # beyond the trained context: extend the tables
            cos, sin = rotary_tables(self.config.head_dim, end, self.config.rope_theta, self.rope_cos.device,
                                     self.config.rope_scaling)
            return cos[start:end], sin[start:end]
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, loss_reduction: str = "mean"):
        """(logits, None) for every position; with `targets`, (None, the cross-entropy loss).

        The loss is computed from the last hidden states a chunk of tokens at a time (llmpipe.model.loss), so
        no tensor of all tokens × vocabulary exists; `full_logits_loss` computes it from all logits at once
        and returns them too. Targets equal to IGNORE_INDEX are left out. `loss_reduction="sum"` returns the
        summed loss (the training loop divides by the number of target tokens in the whole global batch).
        With a `cache`, `tokens` continue the cached sequence and the cache is advanced.
        """
        start = cache.length if cache is not None else 0
        cos, sin = self._rotary(start, tokens.shape[1])
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        hidden = self.norm(x)
        if targets is None:
            return self.lm_head(hidden.to(self.lm_head.weight.dtype)), None
        if self.full_logits_loss:
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
            return logits, full_logits_cross_entropy(logits, targets, loss_reduction)
        return None, chunked_cross_entropy(hidden, self.lm_head.weight, targets, loss_reduction)

    @torch.no_grad()
    def attention_weights(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every layer, each (batch, n_head, time, time), for heatmaps."""
        cos, sin = self._rotary(0, tokens.shape[1])
        x = self.embed(tokens)
        weights = []
        for block in self.layers:
            attended, layer_weights = block.self_attn(block.input_layernorm(x), cos, sin, return_weights=True)
            x = x + attended
            x = x + block.mlp(block.post_attention_layernorm(x))
            weights.append(layer_weights)
        return weights

    @property
    def dtype(self) -> torch.dtype:
        """What the blocks hold and compute in: the checkpoint's own dtype (fp32, bf16 or fp16). The embedding
        and output head may hold fp32 while they train (fine-tuning's chat tokens) over frozen bf16 blocks."""
        return self.norm.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens).to(self.dtype)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.config, batch_size, max_length, self.norm.weight.device, self.dtype)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (regional compilation): the blocks share one
    compiled graph, so compile time does not grow with depth. Works for ours (`model.layers`) and for
    transformers' LlamaModel (also `.layers`); DDP and FSDP2 wrap the compiled blocks as they are."""
    for block in model.layers:
        block.compile()


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (a tied embedding is one matrix)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
