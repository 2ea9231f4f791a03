"""The bidirectional transformer: the attention mask, the loss, and stream coverage."""

import math

import pytest
import torch
import torch.nn.functional as F

from shared.vocab import IGNORE_INDEX
from trainer.model.losses import supervised_loss
from trainer.model.transformer import BidirectionalTransformer, ModelConfig, key_padding_mask

from helpers.streams import SyntheticStream


def tiny_model(meta, positions="learned", seed=0):
    torch.manual_seed(seed)
    return BidirectionalTransformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, positions=positions).for_stream(meta)).eval()


def test_key_padding_mask_is_true_for_real_tokens_and_broadcasts_over_queries():
    attention_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    attend = key_padding_mask(attention_mask)
    assert attend.dtype == torch.bool and attend.shape == (2, 1, 1, 5)
    assert attend[0, 0, 0].tolist() == [True, True, True, False, False]
    assert attend[1].all(), "a row with no padding must be all True (never fully masked)"


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_masked_sdpa_equals_hand_written_masked_softmax(positions):
    stream = SyntheticStream(block_size=32, batch_size=4, seed=1)
    batch = stream.batch()
    assert (batch["attention_mask"] == 0).any(dim=1).sum() >= 2, "the batch must have padded rows"
    model = tiny_model(stream.meta, positions)
    attention = model.blocks[0].attn
    h = torch.randn(4, 32, 32)
    with torch.no_grad():
        for parameter in attention.parameters():  # O(1) weights, so the tolerances below mean something
            parameter.normal_(std=0.3)
        q, k, v = attention.heads(h)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        padding_key = (batch["attention_mask"] == 0)[:, None, None, :]
        weights = torch.softmax(scores.masked_fill(padding_key, float("-inf")), dim=-1)
        expected = attention.merge(weights @ v)
        actual = attention(h, key_padding_mask(batch["attention_mask"]))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # the padded keys really carry weight without the mask: the comparison is not vacuous
    unmasked = attention.merge(torch.softmax(scores, dim=-1) @ v)
    assert not torch.allclose(unmasked, expected, atol=1e-4)


def test_padded_query_positions_and_unpadded_rows_give_finite_logits():
    stream = SyntheticStream(block_size=48, batch_size=6, seed=2)
    batch = stream.batch()
    batch["attention_mask"][0] = 1  # a row with no padding at all
    model = tiny_model(stream.meta)
    with torch.no_grad():
        logits = model(batch["x"], batch["attention_mask"])
    padded = batch["attention_mask"] == 0
    assert padded.any()
    assert torch.isfinite(logits[padded]).all()
    assert torch.isfinite(logits[0]).all()


def test_loss_ignores_unsupervised_positions():
    stream = SyntheticStream(block_size=32, batch_size=4, seed=3)
    batch = stream.batch()
    model = tiny_model(stream.meta)
    with torch.no_grad():
        logits = model(batch["x"], batch["attention_mask"])
        loss, _ = supervised_loss(logits, batch["y"])
    supervised = batch["y"] != IGNORE_INDEX
    expected = F.cross_entropy(logits[supervised], batch["y"][supervised])
    torch.testing.assert_close(loss, expected)
    # garbage logits at ignored positions do not change the loss
    noisy = logits.clone()
    noisy[~supervised] = torch.randn_like(noisy[~supervised]) * 100
    torch.testing.assert_close(supervised_loss(noisy, batch["y"])[0], expected)


def test_inverse_t_weighting_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)
    targets = torch.tensor([[1, -100, 2, -100], [0, 0, 4, 3], [-100, -100, -100, 2]])
    mask_ratio = torch.tensor([0.5, 1.0, 0.0])  # row 2's ratio is clamped to 1e-3
    log_probs = torch.log_softmax(logits, dim=-1)
    numerator = denominator = 0.0
    for b, weight in enumerate([2.0, 1.0, 1000.0]):
        for t in range(4):
            if targets[b, t] != -100:
                numerator += weight * -log_probs[b, t, targets[b, t]].item()
                denominator += weight
    loss, _ = supervised_loss(logits, targets, mask_ratio, "inverse-t")
    assert loss.item() == pytest.approx(numerator / denominator, rel=1e-5)
    equal_ratios, _ = supervised_loss(logits, targets, torch.full((3,), 0.3), "inverse-t")
    torch.testing.assert_close(equal_ratios, supervised_loss(logits, targets)[0])


def test_loss_of_a_batch_without_supervision_is_zero():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.full((2, 3), IGNORE_INDEX)
    for weighting in ("none", "inverse-t"):
        loss, _ = supervised_loss(logits, targets, torch.ones(2), weighting)
        assert loss.item() == 0.0


def test_check_covers_refuses_a_model_too_small_for_the_stream():
    meta = SyntheticStream(block_size=64).meta
    ModelConfig().for_stream(meta).check_covers(meta)
    with pytest.raises(ValueError, match="pad_id"):
        ModelConfig(vocab_size=meta.vocab_size - 1, block_size=64).check_covers(meta)
    with pytest.raises(ValueError, match="block_size 64 > the model's block_size 32"):
        ModelConfig(vocab_size=meta.vocab_size, block_size=32).check_covers(meta)


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(vocab_size=10, block_size=8, n_head=3, n_embd=32)
    with pytest.raises(ValueError, match="positions"):
        ModelConfig(vocab_size=10, block_size=8, positions="alibi")


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_training_a_few_steps_lowers_the_loss(positions):
    stream = SyntheticStream(block_size=48, batch_size=8, seed=4)
    batch = stream.batch()
    model = tiny_model(stream.meta, positions).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = supervised_loss(model(batch["x"], batch["attention_mask"]), batch["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
