"""The start-up mask self-test catches inverted and ignored masks and passes a correct model."""

import pytest
import torch

import trainer.model.transformer
from trainer.model.selftest import MaskSelfTestError, mask_self_test
from trainer.model.transformer import BidirectionalTransformer, ModelConfig

from helpers.streams import SyntheticStream, invert_key_padding_mask


@pytest.fixture
def setup():
    stream = SyntheticStream(block_size=48, batch_size=6, seed=5)
    torch.manual_seed(0)
    model = BidirectionalTransformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.1).for_stream(stream.meta))
    return stream, model


def test_a_correct_model_passes_and_train_mode_is_restored(setup):
    stream, model = setup
    batch = stream.batch()
    result = mask_self_test(model, batch, stream.meta)
    assert model.training
    assert result["rows"] == 6 and result["rows_with_padding"] > 0
    assert result["padding_check"] == "passed"
    assert result["max_visible_change_from_padding"] <= 1e-5
    assert result["other_visible_changed_fraction"] > 0.5


def test_an_inverted_mask_is_caught(setup, monkeypatch):
    stream, model = setup
    invert_key_padding_mask(monkeypatch)
    with pytest.raises(MaskSelfTestError, match="inverted"):
        mask_self_test(model, stream.batch(), stream.meta)


def test_an_inverted_mask_is_caught_on_padded_rows_alone(setup, monkeypatch):
    stream, model = setup
    batch = stream.batch()
    padded = (batch["attention_mask"] == 0).any(dim=1)
    batch = {name: tensor[padded] for name, tensor in batch.items()}
    invert_key_padding_mask(monkeypatch)
    with pytest.raises(MaskSelfTestError, match="tokens after \\[SEP\\] changed"):
        mask_self_test(model, batch, stream.meta)


def test_an_inverted_mask_is_caught_on_rows_without_padding(setup, monkeypatch):
    stream, model = setup
    batch = stream.batch()
    batch["attention_mask"][:] = 1
    batch["x"][batch["x"] == stream.meta.pad_id] = 0
    invert_key_padding_mask(monkeypatch)
    with pytest.raises(MaskSelfTestError, match="inverted"):
        mask_self_test(model, batch, stream.meta)


def test_an_ignored_mask_is_caught(setup, monkeypatch):
    stream, model = setup
    monkeypatch.setattr(trainer.model.transformer, "key_padding_mask", lambda attention_mask: None)
    with pytest.raises(MaskSelfTestError, match="attend to padding"):
        mask_self_test(model, stream.batch(), stream.meta)


def test_a_model_whose_tokens_cannot_see_each_other_is_caught(setup, monkeypatch):
    stream, model = setup
    # each real token attends only to itself: no leak from padding, but no context either
    monkeypatch.setattr(
        trainer.model.transformer.F,
        "scaled_dot_product_attention",
        lambda q, k, v, attn_mask=None, dropout_p=0.0: v,
    )
    with pytest.raises(MaskSelfTestError, match="cannot see each other"):
        mask_self_test(model, stream.batch(), stream.meta)


def test_a_causal_mask_is_caught(setup, monkeypatch):
    stream, model = setup
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def causal(q, k, v, attn_mask=None, dropout_p=0.0):
        T = q.size(-2)
        return sdpa(q, k, v, attn_mask=attn_mask & torch.ones(T, T, dtype=torch.bool).tril(), dropout_p=dropout_p)

    monkeypatch.setattr(trainer.model.transformer.F, "scaled_dot_product_attention", causal)
    with pytest.raises(MaskSelfTestError, match="before it"):
        mask_self_test(model, stream.batch(), stream.meta)


def test_a_batch_without_padding_says_check_a_was_vacuous(setup):
    stream, model = setup
    batch = stream.batch()
    batch["attention_mask"][:] = 1
    result = mask_self_test(model, batch, stream.meta)
    assert result["rows_with_padding"] == 0
    assert result["padding_check"].startswith("vacuous")
