"""The typed corruption description (shared/corruption.py): wire form, validation, what it implies."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.corruption import (
    POLICY_TYPES,
    RANDOM_TOKEN,
    BertPolicy,
    Corruption,
    CorruptionError,
    RandomStage,
    SpanPolicy,
    SpanStage,
    StagesPolicy,
    StickyStage,
    UniformPolicy,
    policy_flags,
)
from shared.data_config import DataConfig

STAGES = StagesPolicy(train=(RandomStage(0.5), StickyStage(0.4, 0.15, 0.3), SpanStage(3)), val=(RandomStage(1),))


@pytest.mark.parametrize("policy", [BertPolicy(0.15), BertPolicy(1), UniformPolicy((0, 1)), UniformPolicy((0.25, 0.5)), STAGES,
                                    SpanPolicy(0.15, 3.0), SpanPolicy(1, 1)])
@pytest.mark.parametrize("supervise_sep, random_token", [(None, None), (False, RANDOM_TOKEN), (True, None)])
def test_the_json_form_round_trips_byte_for_byte(policy, supervise_sep, random_token):
    corruption = Corruption(policy, (1, 0, 0), supervise_sep, random_token)
    text = corruption.json_text
    again = Corruption.from_json(text)
    assert again == corruption and again.json_text == text and again.policy == policy
    assert json.loads(text)["policy"] == policy.name
    assert ("supervise_sep" in json.loads(text)) == (supervise_sep is not None)


def test_numbers_keep_their_json_type():
    """1 and 1.0 are different texts, so different digests: the typed form keeps which it was."""
    whole, decimal = Corruption(BertPolicy(1), (1, 0, 0)), Corruption(BertPolicy(1.0), (1.0, 0.0, 0.0))
    assert whole.json_text == '{"mask_fractions":[1,0,0],"mask_prob":1,"policy":"bert"}'
    assert decimal.json_text == '{"mask_fractions":[1.0,0.0,0.0],"mask_prob":1.0,"policy":"bert"}'
    assert whole != decimal


@pytest.mark.parametrize("text, message", [
    ('{"mask_fractions":[0.8,0.1,0.1],"mask_prob":0,"policy":"bert"}', "mask_prob"),
    ('{"mask_fractions":[0.8,0.1,0.1],"policy":"uniform","ratio_range":[0.5]}', "ratio range"),
    ('{"mask_fractions":[0.8,0.1,0.1],"policy":"uniform"}', "missing"),
    ('{"mask_fractions":[0.8,0.1,0.1],"policy":"stages","stages":{"train":[{"type":"sticky","p1_probability":0,'
     '"p2_probability":0.5,"target_masked_ratio":0.5}],"val":[{"spans_count":2,"type":"span"}]}}', r"stages.train\[0\].*p1"),
    ('{"mask_fractions":[0.8,0.1,0.1],"policy":"stages","stages":{"train":[{"spans_count":true,"type":"span"}],'
     '"val":[{"spans_count":2,"type":"span"}]}}', "spans_count"),
    ('{"mask_fractions":[0.8,0.1,0.1],"mask_prob":0.1,"policy":"bert","random_token":3}', "random_token"),
    ('{"mask_fractions":[0.8,0.1,0.1],"mask_prob":0.1,"policy":"zigzag"}', "policy"),
    ("[" * 100_000, "not JSON"),
    ('{"mask_fractions":[0.8,0.1,0.1],"policy":"span","span_mean":0.5,"span_ratio":0.15}', "span_mean"),
    ('{"mask_fractions":[0.8,0.1,0.1],"policy":"span","span_ratio":0.15}', "missing"),
])
def test_invalid_descriptions_name_the_field(text, message):
    with pytest.raises(CorruptionError, match=message):
        Corruption.from_json(text)


def test_the_candidate_rule():
    content = np.array([0, 5, 127])
    plain, with_sep = Corruption(BertPolicy(0.15)), Corruption(BertPolicy(0.15), supervise_sep=True)
    assert plain.candidates(content, "lines").tolist() == [0, 5, 127]
    assert with_sep.candidates(content, "lines").tolist() == [1, 6, 128]
    assert with_sep.candidates(content, "fixed").tolist() == [0, 5, 127]  # fixed rows have no [SEP]
    assert (plain.most_candidates(128, "lines"), with_sep.most_candidates(128, "lines"), with_sep.most_candidates(128, "fixed")) \
        == (127, 128, 128)


def test_what_a_description_implies():
    assert [cls.carries_stage for cls in POLICY_TYPES.values()] == [cls is StagesPolicy for cls in POLICY_TYPES.values()]
    assert STAGES.stage_count("train") == 3 and STAGES.stage_count("val") == 1 and BertPolicy(0.1).stage_count("val") == 0
    parts = Corruption(STAGES).floor_parts("train", 100)
    assert [part.mask_only for part in parts] == [False, False, True]
    assert parts[0].ratio == 0.25 and parts[1].ratio == 0.4
    assert Corruption(UniformPolicy((0.0, 1.0)), (1.0, 0.0, 0.0)).nll_bound_unavailable() is None
    assert "mask-only" in Corruption(UniformPolicy((0, 1))).nll_bound_unavailable()
    assert "ratio-range" in Corruption(UniformPolicy((0.1, 1)), (1, 0, 0)).nll_bound_unavailable()
    assert "bert" in Corruption(BertPolicy(0.5), (1, 0, 0)).nll_bound_unavailable()


def test_every_policy_flag_is_a_data_setting_and_builds_the_policy():
    fields = DataConfig.__dataclass_fields__
    assert set(policy_flags()) <= set(fields)
    assert DataConfig(policy="uniform", ratio_range=(0, 1)).corruption() == Corruption(
        UniformPolicy((0.0, 1.0)), (0.8, 0.1, 0.1), False, RANDOM_TOKEN)
    with pytest.raises(ValueError, match="--stages applies only to --policy stages"):
        DataConfig(policy="bert", stages="x.toml")


@settings(max_examples=50, deadline=None)
@given(st.floats(0.001, 1.0), st.booleans())
def test_a_producer_description_parses_back_exactly(mask_prob, supervise_sep):
    corruption = DataConfig(mask_prob=mask_prob, supervise_sep=supervise_sep).corruption()
    assert Corruption.from_json(corruption.json_text).json_text == corruption.json_text
