"""The bidirectional transformer trained on Linepack batches (docs/SPEC.md §7).

One file in the spirit of nanoGPT's ``model.py``: token embedding, positions (rotary by
default, or learned absolute), pre-norm blocks (LayerNorm, self-attention, MLP), a final
LayerNorm and a tied output head. Attention is :func:`torch.nn.functional.scaled_dot_product_attention` with a
key-padding mask built in exactly one place, :func:`key_padding_mask`.

Shapes: B rows, T positions (T <= block_size), C = n_embd, V = vocab_size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import settings
from shared.meta import StreamMeta
from shared.settings import above, at_least, in_range, setting

POSITION_KINDS = ("learned", "rotary")


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean mask from the stream's ``attention_mask``.

    Args:
        attention_mask: (B, T) integers, 1 = real token (up to and including [SEP]), 0 = [PAD].
    Returns:
        bool (B, 1, 1, T): True = this key may be attended. It broadcasts over heads and
        queries, so every query row (padded ones included) sees exactly the real keys of
        its row, and no row is fully masked because every row has at least one real token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    return (attention_mask == 1)[:, None, None, :]


@dataclass(frozen=True)
class ModelConfig:
    """Model hyper-parameters. ``vocab_size`` and ``block_size`` come from the stream
    (:meth:`for_stream`); 0 means not known yet. The others are settings (``--n-layer`` ...)."""

    vocab_size: int = 0
    block_size: int = 0
    n_layer: int = setting(4, "transformer blocks", metavar="N", check=at_least(1))
    n_head: int = setting(4, "attention heads per block", metavar="N", check=at_least(1))
    n_embd: int = setting(128, "embedding width C", metavar="C", check=at_least(1))
    dropout: float = setting(0.0, "dropout probability", check=in_range(0.0, 1.0, name="dropout", high_open=True))
    positions: str = setting("rotary", "position embedding: rotary, or learned absolute (with learned positions the model "
                                       "can stay on the context-free plateau for over 1000 steps; docs/PLATEAU.md)",
                             choices=POSITION_KINDS)
    bias: bool = setting(True, "biases in Linear and LayerNorm")
    qk_norm: bool = setting(False, "RMSNorm on each head's queries and keys before attention")
    init_std: float = setting(0.02, "std of the normal initialization of weights and embeddings (residual projections: "
                                    "this / sqrt(2 n_layer))", check=above(0))

    def __post_init__(self) -> None:
        settings.check_fields(self)
        if self.positions not in POSITION_KINDS:
            raise ValueError(f"positions {self.positions!r} is not one of {POSITION_KINDS}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size (n_embd / n_head), got {self.n_embd // self.n_head}; "
                             "change --n-embd or --n-head, or use --positions learned")

    def for_stream(self, meta: StreamMeta) -> ModelConfig:
        """This config with the stream's vocabulary and block size."""
        return dataclasses.replace(self, vocab_size=meta.vocab_size, block_size=meta.block_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_covers(self, meta: StreamMeta) -> None:
        """Raise ValueError unless every id and every position of the stream fits this model."""
        problems = [
            f"{name} {value} >= the model's vocab_size {self.vocab_size}"
            for name, value in (
                ("the stream's vocab_size - 1", meta.vocab_size - 1),
                ("mask_id", meta.mask_id),
                ("sep_id", meta.sep_id),
                ("pad_id", meta.pad_id),
            )
            if value >= self.vocab_size
        ]
        if meta.block_size > self.block_size:
            problems.append(f"the stream's block_size {meta.block_size} > the model's block_size {self.block_size}")
        if problems:
            raise ValueError("the model does not cover the stream: " + "; ".join(problems))


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) applied to queries and keys."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0) -> None:
        super().__init__()
        inverse_frequency = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inverse_frequency)  # (block, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, hs) -> the same, each (first half, second half) pair rotated by its angle."""
        T = q.size(-2)
        cos, sin = self.cos[:T].to(q.dtype), self.sin[:T].to(q.dtype)
        first, second = q.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention over the real keys of each row."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        head_size = config.n_embd // config.n_head
        self.rotary = Rotary(head_size, config.block_size) if config.positions == "rotary" else None
        self.q_norm = nn.RMSNorm(head_size) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(head_size) if config.qk_norm else None

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (B, H, T, hs), positions applied."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        return q, k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hs) attention outputs -> (B, T, C) after the output projection."""
        B, H, T, hs = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, H * hs)))

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C); attend: bool (B, 1, 1, T) from :func:`key_padding_mask`."""
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0)
        return self.merge(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


class BidirectionalTransformer(nn.Module):
    """Masked-LM transformer: every real token attends to every real token of its row."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in nanoGPT
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(parameter, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V); the loss is ``trainer.model.losses``'s.

        Args:
            x: (B, T) int64 token ids.
            attention_mask: (B, T) int64, 1 = real token, 0 = [PAD].
        """
        B, T = x.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        h = self.wte(x)
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(T, device=x.device))
        h = self.drop(h)
        attend = key_padding_mask(attention_mask)
        for block in self.blocks:
            h = block(h, attend)
        return self.lm_head(self.ln_f(h))
