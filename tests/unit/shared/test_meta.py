"""StreamMeta: wire form, stable digest, differences, strict parsing (docs/SPEC.md §3)."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.corruption import Corruption
from shared.meta import MetaError, StreamMeta, canonical_json
from shared.tokenizer import ByteTokenizer, CharTokenizer, sha256_hex, tokenizer_from_definition

from helpers import ROOT
from helpers.wire import make_meta

DIGEST_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from helpers.wire import make_meta
print(make_meta(block_size=32, chars="\\n ab\\u00e9\\U0001f600", packing="fixed", seed=7).digest)
"""


def test_to_dict_from_dict_round_trip():
    meta = make_meta()
    data = meta.to_dict()
    assert type(data["token_counts"]) is list
    assert json.loads(json.dumps(data)) == data  # plain JSON-able values only
    again = StreamMeta.from_dict(data)
    assert again == meta
    assert again.digest == meta.digest
    assert again.corruption == meta.corruption and again.corruption.json_text == meta.corruption.json_text


@given(
    block_size=st.integers(2, 65536),
    rows=st.integers(1, 4096),
    chars=st.sets(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    packing=st.sampled_from(["lines", "fixed"]),
    seed=st.integers(0, 2**63 - 1),
    val_messages=st.integers(0, 10**6),
)
@settings(max_examples=100, deadline=None, derandomize=True, database=None)
def test_round_trip_any_valid_meta(block_size, rows, chars, packing, seed, val_messages):
    meta = make_meta(block_size, rows, "".join(sorted(chars)), packing, val_messages, seed)
    assert StreamMeta.from_dict(meta.to_dict()) == meta


def test_digest_is_canonical_json_sha256_prefix():
    import hashlib

    meta = make_meta()
    expected = hashlib.sha256(canonical_json(meta.to_dict()).encode()).hexdigest()[:16]
    assert meta.digest == expected and len(meta.digest) == 16


def test_digest_stable_across_processes_and_hash_seeds():
    meta = make_meta(block_size=32, chars="\n ab\u00e9\U0001f600", packing="fixed", seed=7)
    digests = set()
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", DIGEST_SCRIPT, str(ROOT), str(ROOT / "tests")],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )
        digests.add(result.stdout.strip())
    assert digests == {meta.digest}


def test_digest_depends_on_every_field():
    meta = make_meta()
    changed = [
        make_meta(block_size=17),
        make_meta(rows_per_message=5),
        make_meta(chars=meta.vocab + "~"),
        make_meta(packing="fixed"),
        make_meta(val_messages=4),
        make_meta(seed=1),
    ]
    assert len({meta.digest, *(m.digest for m in changed)}) == 1 + len(changed)


def test_differences_name_fields_and_both_values():
    mine, theirs = make_meta(block_size=16), make_meta(block_size=32, seed=3)
    assert mine.differences(mine) == []
    assert mine.differences(theirs) == [("block_size", 16, 32), ("seed", 0, 3)]
    other_vocab = make_meta(chars="ab")
    fields = [name for name, _, _ in mine.differences(other_vocab)]
    assert fields[:6] == ["vocab", "tokenizer_digest", "vocab_size", "mask_id", "sep_id", "pad_id"]
    assert "token_counts" in fields


@pytest.mark.parametrize("missing", ["block_size", "vocab", "token_counts", "corruption"])
def test_from_dict_rejects_missing_field(missing):
    data = make_meta().to_dict()
    del data[missing]
    with pytest.raises(MetaError, match=missing):
        StreamMeta.from_dict(data)


def test_from_dict_rejects_extra_field():
    with pytest.raises(MetaError, match="surprise"):
        StreamMeta.from_dict({**make_meta().to_dict(), "surprise": 1})


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 16.0),
        ("block_size", "16"),
        ("block_size", True),
        ("seed", None),
        ("vocab", ["a", "b"]),
        ("packing", 1),
        ("token_counts", "123"),
        ("token_counts", [1.0] * 33),
        ("token_counts", [True] * 33),
        ("token_counts", [-1] * 33),
    ],
)
def test_from_dict_rejects_mistyped_field(field, value):
    with pytest.raises(MetaError, match=field):
        StreamMeta.from_dict({**make_meta().to_dict(), field: value})


@pytest.mark.parametrize("data", [None, [], "meta", 3])
def test_from_dict_rejects_non_map(data):
    with pytest.raises(MetaError):
        StreamMeta.from_dict(data)


@pytest.mark.parametrize(
    "field, delta", [("vocab_size", 1), ("mask_id", 1), ("sep_id", -1), ("pad_id", 1), ("ignore_index", 99)]
)
def test_inconsistent_special_ids_rejected(field, delta):
    data = make_meta().to_dict()
    data[field] += delta
    with pytest.raises(MetaError, match=field):
        StreamMeta.from_dict(data)


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 1),
        ("block_size", 65537),
        ("rows_per_message", 0),
        ("packing", "zigzag"),
        ("sampling", "sometimes"),
        ("val_messages", -1),
        ("token_counts", [1, 2]),
        ("corruption", "{not json"),
        ("corruption", "[" * 100_000),  # json.loads raises RecursionError
    ],
)
def test_inconsistent_values_rejected_as_meta_error(field, value):
    data = make_meta().to_dict()
    data[field] = value
    with pytest.raises(MetaError):
        StreamMeta.from_dict(data)


@pytest.mark.parametrize("vocab", ["ba", "aa", ""])
def test_bad_vocabulary_surfaces_as_meta_error(vocab):
    # Special ids consistent with len(vocab), so only the Vocabulary check can object.
    base = len(vocab)
    data = {**make_meta().to_dict(), "vocab": vocab, "vocab_size": base + 3, "mask_id": base,
            "sep_id": base + 1, "pad_id": base + 2, "token_counts": [1] * base,
            "tokenizer_digest": sha256_hex(vocab.encode())}
    with pytest.raises(MetaError, match="vocab"):
        StreamMeta.from_dict(data)


def build(tokenizer=None, corruption=None, counts=None, **rest):
    tokenizer = tokenizer or CharTokenizer("ab")
    fields = dict(block_size=4, rows_per_message=1, packing="lines", sampling="epoch", seed=0,
                  corpus_fingerprint="f" * 16, val_messages=0)
    corruption = corruption or {"policy": "bert", "mask_prob": 0.15, "mask_fractions": [0.8, 0.1, 0.1]}
    return StreamMeta.build(tokenizer, Corruption.from_dict(corruption), counts or [3] * tokenizer.base_size, **{**fields, **rest})


def test_build_canonicalises_corruption():
    a = build(corruption={"mask_prob": 0.5, "policy": "bert", "mask_fractions": [1, 0, 0]}, counts=[3, 4])
    assert a.to_wire()["corruption"] == '{"mask_fractions":[1,0,0],"mask_prob":0.5,"policy":"bert"}'
    assert a.corruption.to_dict() == {"mask_fractions": [1, 0, 0], "mask_prob": 0.5, "policy": "bert"}
    assert a.counts.tolist() == [3, 4]


@pytest.mark.parametrize("corruption", [
    "[]",  # valid JSON, no policy: once crashed the trainer after it was pinned
    '{"policy":"bert"}',  # no mask_prob, no mask_fractions
    '{"mask_fractions":[0.8,0.1,0.1],"mask_prob":2,"policy":"bert"}',
    '{"mask_fractions":[0.8,0.1],"mask_prob":0.1,"policy":"bert"}',
    '{"mask_fractions":[0.8,0.1,0.2],"mask_prob":0.1,"policy":"bert"}',
    '{"mask_fractions":[0.8,0.1,0.1],"policy":"uniform","ratio_range":[0.6,0.2]}',
    '{"mask_fractions":[0.8,0.1,0.1],"mask_prob":0.1,"policy":"bert","surprise":1}',
    '{"mask_fractions":[0.8,0.1,0.1],"mask_prob":0.1,"policy":"bert","supervise_sep":1}',
    '{"mask_fractions":[0.8,0.1,0.1],"policy":"stages","stages":{"train":[],"val":[]}}',
    '{"mask_fractions":[0.8,0.1,0.1],"policy":"stages","stages":{"train":[{"type":"random"}],"val":[{"type":"span","spans_count":1}]}}',
    '{"mask_fractions":[0.8,0.1,0.1],"policy":"stages","stages":{"train":[{"type":"zigzag"}],"val":[]}}',
    '{"policy": "bert", "mask_prob": 0.15, "mask_fractions": [0.8, 0.1, 0.1]}',  # not canonical (spaces, key order)
    '{"mask_fractions":[0.8,0.1,0.1],"mask_prob":NaN,"policy":"bert"}',
])
def test_the_corruption_schema_is_checked_in_full(corruption):
    with pytest.raises(MetaError, match="corruption"):
        StreamMeta.from_dict({**make_meta().to_dict(), "corruption": corruption})


@pytest.mark.parametrize("field, value", [
    ("corpus_fingerprint", "F" * 16), ("corpus_fingerprint", "0123"), ("tokenizer_digest", "ab" * 31),
    ("tokenizer", "words"), ("seed", 2**63),
])
def test_formats_and_ranges_are_checked(field, value):
    with pytest.raises(MetaError, match=field):
        StreamMeta.from_dict({**make_meta().to_dict(), field: value})


def test_the_tokenizer_fields_agree_with_each_other():
    assert build(ByteTokenizer(), counts=[1] * 256).tokens.kind == "bytes"
    data = make_meta().to_dict()
    with pytest.raises(MetaError, match="tokenizer_digest"):
        StreamMeta.from_dict({**data, "tokenizer_digest": sha256_hex(b"something else")})
    with pytest.raises(MetaError, match="bytes stream"):
        StreamMeta.from_dict({**data, "tokenizer": "bytes"})
    with pytest.raises(MetaError, match="hf stream"):
        StreamMeta.from_dict({**data, "tokenizer": "hf", "vocab": ""})


def test_a_protocol_one_meta_reads_as_a_char_stream():
    meta = make_meta()
    old = {name: value for name, value in meta.to_dict().items() if name not in ("tokenizer", "tokenizer_digest")}
    assert StreamMeta.from_v1_dict(old) == meta


@pytest.mark.parametrize("definition", ['{"not": "a tokenizer"}', "not json at all", '{"model": {"type": "BPE"}}'])
def test_a_forged_hf_meta_is_refused_when_parsed_not_when_first_sampled(definition):
    """Issue 26 item 1: an hf meta whose tokenizer text does not load (its SHA-256 matching) is a
    MetaError at parse time, so it can never be pinned and crash the live sampler later."""
    data = {**make_meta().to_dict(), "tokenizer": "hf", "vocab": definition,
            "tokenizer_digest": sha256_hex(definition.encode("utf-8"))}
    with pytest.raises(MetaError, match="vocab.*tokenizers"):
        StreamMeta.from_dict(data)


def test_an_hf_meta_whose_size_disagrees_with_its_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    definition = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).to_str()
    good = build(tokenizer_from_definition("hf", definition), counts=[1, 1, 1])
    assert good.tokens.base_size == 3
    data = {**good.to_dict(), "mask_id": 33, "sep_id": 34, "pad_id": 35, "vocab_size": 36, "token_counts": [1] * 33}
    with pytest.raises(MetaError, match="3 base ids"):
        StreamMeta.from_dict(data)
