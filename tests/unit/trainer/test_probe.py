"""The attention probe against direct computations on tiny real models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.vocab import IGNORE_INDEX
from trainer.diagnostics.probe import attention_probe, build_probe_set

VOCAB, T = 11, 24


class PoolingModel(nn.Module):
    """logits_t = own(x_t) + context(mean of the embeddings of the attended keys) (+ dropout)."""

    def __init__(self, uses_context: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.own = nn.Embedding(VOCAB, VOCAB)
        self.embed = nn.Embedding(VOCAB, 8)
        self.context = nn.Linear(8, VOCAB)
        self.uses_context = uses_context
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attention_mask):
        logits = self.drop(self.own(x))
        if self.uses_context:
            weights = attention_mask.float()[:, :, None]
            pooled = (self.embed(x) * weights).sum(1) / weights.sum(1)
            logits = logits + self.context(pooled)[:, None, :]
        return logits


def make_val_batches(batches: int = 3, batch_size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Line-packed-looking rows: content, [SEP], [PAD] tail; ~30% of the content supervised."""
    generator = torch.Generator().manual_seed(seed)
    mask_id, sep_id, pad_id = VOCAB - 3, VOCAB - 2, VOCAB - 1
    out = []
    for _ in range(batches):
        x = torch.randint(0, VOCAB - 3, (batch_size, T), generator=generator)
        valid = torch.randint(4, T + 1, (batch_size,), generator=generator)
        positions = torch.arange(T)[None, :]
        attention_mask = (positions < valid[:, None]).long()
        y = torch.where(torch.rand(batch_size, T, generator=generator) < 0.3, x, IGNORE_INDEX)
        y[positions >= valid[:, None] - 1] = IGNORE_INDEX
        x = torch.where(y != IGNORE_INDEX, torch.full_like(x, mask_id), x)
        x[positions == valid[:, None] - 1] = sep_id
        x[positions >= valid[:, None]] = pad_id
        out.append({"x": x, "y": y, "attention_mask": attention_mask})
    return out


def direct_loss(model, x, attention_mask, y) -> float:
    logits = model(x, attention_mask)
    return float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX))


def brute_force_no_context(model, probe) -> float:
    """One full-length row per sampled position, attention one-hot at it: no truncation."""
    losses = []
    for row, position in zip(probe.sample_rows.tolist(), probe.sample_positions.tolist()):
        attention_mask = torch.zeros(1, T, dtype=torch.long)
        attention_mask[0, position] = 1
        logits = model(probe.x[row : row + 1], attention_mask)
        losses.append(F.cross_entropy(logits[0, position : position + 1], probe.y[row, position : position + 1]))
    return float(torch.stack(losses).mean())


def test_probe_set_is_the_first_rows_and_a_seeded_sample_of_supervised_positions():
    batches = make_val_batches()
    probe = build_probe_set(batches, rows=6, no_context_positions=10, seed=3)
    assert torch.equal(probe.x, torch.cat([b["x"] for b in batches])[:6])
    assert len(probe.sample_rows) == 10
    assert bool((probe.y[probe.sample_rows, probe.sample_positions] != IGNORE_INDEX).all())
    again = build_probe_set(batches, rows=6, no_context_positions=10, seed=3)
    assert torch.equal(probe.sample_positions, again.sample_positions) and torch.equal(probe.sample_rows, again.sample_rows)
    everything = build_probe_set(batches, rows=6, no_context_positions=10_000)
    assert len(everything.sample_rows) == int((probe.y != IGNORE_INDEX).sum())


def test_probe_numbers_match_direct_computation_for_a_context_model():
    model = PoolingModel()
    probe = build_probe_set(make_val_batches(), rows=12, no_context_positions=40)
    result = attention_probe(model, probe, batch_size=5)
    with torch.no_grad():
        assert result.loss_attn == pytest.approx(direct_loss(model, probe.x, probe.attention_mask, probe.y), rel=1e-5)
        noattn = direct_loss(model, probe.x, torch.ones_like(probe.attention_mask), probe.y)
        assert result.loss_noattn == pytest.approx(noattn, rel=1e-5)
        assert result.loss_no_context == pytest.approx(brute_force_no_context(model, probe), rel=1e-5)
    assert result.loss_noattn_minus_attn == pytest.approx(result.loss_noattn - result.loss_attn)
    assert abs(result.loss_noattn_minus_attn) > 1e-4  # the [PAD] tail changes a context model
    assert abs(result.loss_no_context_minus_attn) > 1e-3
    assert result.positions == int((probe.y != IGNORE_INDEX).sum())
    assert result.no_context_positions == 40 and result.rows == 12


def test_a_context_blind_model_loses_nothing_without_context():
    model = PoolingModel(uses_context=False)
    result = attention_probe(model, build_probe_set(make_val_batches(), rows=12, no_context_positions=40))
    assert result.loss_no_context_minus_attn == pytest.approx(0.0, abs=1e-6)
    assert result.loss_noattn_minus_attn == pytest.approx(0.0, abs=1e-6)


def test_probe_runs_in_eval_mode_and_restores_the_mode():
    model = PoolingModel(dropout=0.5).train()
    probe = build_probe_set(make_val_batches(), rows=8)
    first, second = attention_probe(model, probe), attention_probe(model, probe)
    assert first == second  # no dropout noise
    assert model.training
    assert attention_probe(model.eval(), probe) == first and not model.training


def test_probe_on_the_real_transformer_matches_full_length_rows():
    model_module = pytest.importorskip("trainer.model.transformer")
    torch.manual_seed(0)
    config = model_module.ModelConfig(vocab_size=VOCAB, block_size=T, n_layer=1, n_head=2, n_embd=16, dropout=0.1)
    model = model_module.BidirectionalTransformer(config)
    probe = build_probe_set(make_val_batches(), rows=8, no_context_positions=12)
    result = attention_probe(model, probe, batch_size=4)
    model.eval()
    with torch.no_grad():
        assert result.loss_no_context == pytest.approx(brute_force_no_context(model, probe), rel=1e-4)
        assert result.loss_attn == pytest.approx(direct_loss(model, probe.x, probe.attention_mask, probe.y), rel=1e-4)
