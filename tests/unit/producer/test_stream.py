"""BatchStream: wire validity, determinism, producer ids, the val set, epoch sampling, config."""

import argparse
from itertools import islice

import numpy as np
import pytest

from producer.corpus import Corpus, read_text
from producer.packs import FixedPacks, MappedTable
from producer.permutation import ROUNDS, KeyedPermutation
from producer.stream import BatchStream
from shared import settings
from shared.corruption import BASELINE_STAGES, load_stage_file
from shared.data_config import DataConfig
from shared.limits import MAX_VAL_ROWS
from shared.wire import decode, encode

# Unique lines of varied length, so rows can be mapped back to lines.
TEXT = "".join(f"line {i} " + "abcdefg"[: i % 7] * (i % 5) + "\n" for i in range(300)) + "tail with Z\n"


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def stream(corpus_path, **overrides) -> BatchStream:
    settings = {"corpus": corpus_path, "block_size": 64, "rows_per_message": 8, **overrides}
    return BatchStream(DataConfig(**settings))


def frames_of(s: BatchStream, messages: int):
    return [bytes(f) for i, b in enumerate(islice(s.train_batches(), messages)) for f in encode(s.meta, "train", s.producer_id, i, b, i)]


@pytest.mark.parametrize("packing", ["lines", "fixed"])
@pytest.mark.parametrize("policy", ["bert", "uniform", "stages", "span"])
@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_every_message_passes_the_wire_decoder(corpus_path, packing, policy, sampling):
    for supervise_sep in (False, True):
        s = stream(corpus_path, packing=packing, policy=policy, sampling=sampling, supervise_sep=supervise_sep)
        for seq, batch in enumerate(islice(s.train_batches(), 12)):
            message = decode(encode(s.meta, "train", s.producer_id, seq, batch, seq), {s.meta.digest: s.meta})
            assert message.rows == 8 and ("stage" in message.tensors) == (policy == "stages")
            assert {name: batch[name].dtype.str for name in batch} == {
                name: message.tensors[name].dtype.str for name in message.tensors
            }
        val = s.val_set()
        assert len(val) == s.meta.val_messages > 0
        for index, batch in enumerate(val):
            decode(encode(s.meta, "val", s.producer_id, 0, batch, index), {s.meta.digest: s.meta})


def test_meta_vocabulary_counts_and_corruption_description(corpus_path):
    s = stream(corpus_path, policy="stages")
    meta = s.meta
    assert "Z" in meta.vocab  # only in the val lines: the vocabulary covers the whole corpus
    train_text = TEXT[: TEXT.index("line 271 ")]  # 301 lines: 271 train (0..270), 30 val
    counts = dict(zip(meta.vocab, meta.counts.tolist()))
    assert counts["Z"] == 0 and all(counts[c] == train_text.count(c) for c in meta.vocab)
    assert meta.corpus_fingerprint == read_text(corpus_path).fingerprint
    corruption = meta.corruption.to_dict()
    assert corruption["policy"] == "stages" and corruption["mask_fractions"] == [0.8, 0.1, 0.1]
    assert corruption["supervise_sep"] is False
    assert len(corruption["stages"]["train"]) == 9 and len(corruption["stages"]["val"]) == 14
    bert = stream(corpus_path, mask_prob=0.3, supervise_sep=True).meta.corruption.to_dict()
    assert bert["policy"] == "bert" and bert["mask_prob"] == 0.3 and bert["supervise_sep"] is True
    uniform = stream(corpus_path, policy="uniform", ratio_range=(0.1, 0.4)).meta.corruption.to_dict()
    assert uniform["ratio_range"] == [0.1, 0.4]


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_message_k_depends_on_the_seed_and_k_never_on_the_producer(corpus_path, sampling):
    baseline = frames_of(stream(corpus_path, policy="uniform", sampling=sampling, producer_id="a"), 5)
    assert frames_of(stream(corpus_path, policy="uniform", sampling=sampling, producer_id="a"), 5) == baseline
    a, b = stream(corpus_path, sampling=sampling, producer_id="a"), stream(corpus_path, sampling=sampling, producer_id="worker-7")
    for k in (0, 3, 40, 1000):  # any k, in any order, from any producer
        assert all(np.array_equal(a.train_message(k)[name], b.train_message(k)[name]) for name in a.train_message(k))
    other_seed = stream(corpus_path, sampling=sampling, seed=1)
    assert not np.array_equal(a.train_message(0)["x"], other_seed.train_message(0)["x"])
    assert not np.array_equal(a.train_message(0)["x"], a.train_message(1)["x"])


def test_default_producer_id_is_zero(corpus_path):
    assert stream(corpus_path).producer_id == "0"


@pytest.mark.parametrize("policy", ["bert", "stages"])
def test_val_set_is_the_same_for_every_producer_and_covers_every_val_line(corpus_path, policy):
    sets = [stream(corpus_path, policy=policy, producer_id=pid).val_set() for pid in ("0", "1", "worker-7")]
    for other in sets[1:]:
        for a, b in zip(sets[0], other):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    s = stream(corpus_path, policy=policy)
    vocabulary = s.tokenizer
    text = ""
    for batch in sets[0]:
        original = np.where(batch["y"] != -100, batch["y"], batch["x"])
        for row, valid in zip(original, batch["attention_mask"].sum(axis=1)):
            text += vocabulary.decode(row[: valid - 1])
    lines = TEXT.splitlines(keepends=True)
    assert text == "".join(lines[271:])
    assert sum(len(b["x"]) for b in sets[0]) <= MAX_VAL_ROWS


def test_val_set_is_capped(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"{i}\n" for i in range(20000)))
    s = BatchStream(DataConfig(corpus=str(path), block_size=8, rows_per_message=10))
    val = s.val_set()
    assert sum(len(b["x"]) for b in val) == MAX_VAL_ROWS
    assert s.meta.val_messages == len(val) == 26 and len(val[-1]["x"]) == 6


def _row_texts(s: BatchStream, batch) -> list[str]:
    original = np.where(batch["y"] != -100, batch["y"], batch["x"])
    return [s.tokenizer.decode(row[: valid - 1]) for row, valid in zip(original, batch["attention_mask"].sum(axis=1))]


def test_epoch_sampling_sees_every_train_line_once_per_epoch(corpus_path):
    s = stream(corpus_path, sampling="epoch", policy="uniform")
    per_epoch = s.packs_per_epoch
    assert s.meta.epoch_rows == per_epoch
    batches = [s.train_message(k) for k in range(-(-2 * per_epoch // 8) + 1)]
    rows = [text for batch in batches for text in _row_texts(s, batch)]
    train_lines = TEXT.splitlines(keepends=True)[:271]
    for epoch in range(2):
        seen = [line for row in rows[epoch * per_epoch : (epoch + 1) * per_epoch] for line in row.splitlines(keepends=True)]
        assert sorted(seen) == sorted(train_lines)
    assert rows[:per_epoch] != rows[per_epoch : 2 * per_epoch]  # reshuffled each epoch
    # Any k computed on its own (in another process, after a restart) is the k of the whole stream.
    for k in (1, 5, 9):
        alone = stream(corpus_path, sampling="epoch", policy="uniform").train_message(k)
        assert all(np.array_equal(alone[name], batches[k][name]) for name in alone)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_the_epoch_shuffle_is_a_permutation_for_any_size(n):
    keys = np.random.SeedSequence(n).generate_state(ROUNDS, np.uint64)
    permutation = KeyedPermutation(n, keys)
    assert sorted(permutation(np.arange(n)).tolist()) == list(range(n))
    with pytest.raises(IndexError):
        permutation(np.array([n]))


def test_random_sampling_message_k_is_the_stream_from_k(corpus_path):
    s = stream(corpus_path)
    batches = list(islice(s.train_batches(), 4))
    resumed = next(s.train_batches(3))
    assert all(np.array_equal(resumed[k], batches[3][k]) for k in resumed)
    with pytest.raises(ValueError):
        s.train_message(-1)


def test_no_val_set_with_zero_val_fraction(corpus_path):
    s = stream(corpus_path, val_fraction=0.0)
    assert s.meta.val_messages == 0 and s.val_set() == []


def test_explicit_corpus_object_is_used(corpus_path):
    corpus = Corpus("ab\ncd\n" * 10, "inline", "f" * 16)
    s = BatchStream(DataConfig(block_size=16, rows_per_message=2), corpus=corpus)
    assert s.meta.vocab == "\nabcd" and s.meta.corpus_fingerprint == "f" * 16


def parse(argv):
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, DataConfig)
    return settings.from_namespace(DataConfig, parser.parse_args(argv))


def test_flags_defaults_and_parsing():
    assert parse([]) == DataConfig()
    config = parse(["--block-size", "128", "--ratio-range", "0.2,0.6", "--mask-fractions", "1,0,0",
                    "--policy", "uniform", "--supervise-sep", "--producer-id", "w1", "--sampling", "epoch"])
    assert config.block_size == 128 and config.ratio_range == (0.2, 0.6) and config.mask_fractions == (1.0, 0.0, 0.0)
    assert config.supervise_sep and config.producer_id == "w1" and config.sampling == "epoch"
    stages = parse(["--policy", "stages"])
    assert stages.stages is None and stages.corruption().policy == load_stage_file(BASELINE_STAGES)  # the shipped mix


@pytest.mark.parametrize(
    "argv",
    [
        ["--block-size", "1"],
        ["--rows-per-message", "0"],
        ["--mask-prob", "0"],
        ["--ratio-range", "0.6,0.2"],
        ["--ratio-range", "0.5"],
        ["--mask-fractions", "0.8,0.1,0.2"],
        ["--mask-fractions", "a,b,c"],
        ["--val-fraction", "1"],
        ["--seed", "-1"],
        ["--packing", "words"],
        ["--producer-id", ""],
    ],
)
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert "error: argument" in capsys.readouterr().err


def test_bad_combinations_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="--stages applies only"):
        parse(["--stages", "x.toml"])
    with pytest.raises(ValueError, match="stage file"):
        BatchStream(parse(["--policy", "stages", "--stages", str(tmp_path / "missing.toml")]), corpus=Corpus("ab\ncd\n", "x", "f" * 16))
    with pytest.raises(ValueError, match="mask fractions"):
        DataConfig(mask_fractions=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("supervise_sep", [False, True])
def test_sep_is_a_candidate_only_with_supervise_sep(corpus_path, supervise_sep):
    s = stream(corpus_path, policy="uniform", ratio_range=(0.5, 1.0), supervise_sep=supervise_sep)
    sep_labels, sep_inputs = [], []
    for batch in islice(s.train_batches(), 20):
        last = batch["attention_mask"].sum(axis=1) - 1
        rows = np.arange(len(last))
        sep_labels.append(batch["y"][rows, last])
        sep_inputs.append(batch["x"][rows, last])
    labels, inputs = np.concatenate(sep_labels), np.concatenate(sep_inputs)
    if supervise_sep:  # with ratios >= 0.5, many of the 160 [SEP]s are supervised, and their label is [SEP]
        assert 20 < np.count_nonzero(labels != -100) < len(labels) and set(labels[labels != -100]) == {s.meta.sep_id}
    else:
        assert np.all(labels == -100) and np.all(inputs == s.meta.sep_id)


def test_random_rows_start_at_every_train_line_uniformly(corpus_path):
    s = stream(corpus_path, block_size=32, rows_per_message=64)
    counts = np.zeros(271)  # the train lines: "line 0 ..." to "line 270 ..."
    for batch in islice(s.train_batches(), 100):  # 6,400 rows, ~24 per line
        for text in _row_texts(s, batch):
            counts[int(text.split()[1])] += 1  # the row's first line, even when it is cut at the block
    expected = counts.sum() / len(counts)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 270 degrees of freedom: mean 270, sd ~23; a biased sampler (e.g. by line length) lands far above.
    assert chi2 < 270 + 6 * 23, chi2


def test_a_large_corpus_maps_its_tables_from_shared_cache_files(corpus_path, tmp_path, monkeypatch):
    """Above IN_MEMORY_PACKS_MAX_LINES lines the epoch packs and the row lengths of both splits are
    cache files, memory-mapped, named by the corpus and its tokenizer: the same messages."""
    monkeypatch.setenv("LINEPACK_CACHE_DIR", str(tmp_path / "cache"))
    in_memory, bytes_in_memory = stream(corpus_path, sampling="epoch"), stream(corpus_path, sampling="epoch", tokenizer="bytes")
    monkeypatch.setattr("producer.packs.IN_MEMORY_PACKS_MAX_LINES", 10)  # "large": above 10 lines
    mapped = stream(corpus_path, sampling="epoch")
    rows, memory_rows = mapped.sources[0], in_memory.sources[0]
    assert isinstance(rows.epoch_packs, MappedTable) and isinstance(memory_rows.epoch_packs, np.ndarray)
    assert isinstance(rows.train_packer.lengths, MappedTable) and isinstance(rows.val_packer.lengths, MappedTable)
    np.testing.assert_array_equal(rows.epoch_packs.array, memory_rows.epoch_packs)
    np.testing.assert_array_equal(rows.train_packer.lengths.array, memory_rows.train_packer.lengths)
    cached = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert [name.split("-")[1] for name in cached] == ["lengths", "lengths", "packs"] and all(name.startswith("v1-") for name in cached)
    assert all(name.endswith(".npy") and "-64-" in name for name in cached)
    again = stream(corpus_path, sampling="epoch")  # a second producer maps the same files, not new ones
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == cached
    other = stream(corpus_path, sampling="epoch", tokenizer="bytes")  # other ids, other row lengths: other files
    assert len(list((tmp_path / "cache").iterdir())) == 2 * len(cached)
    for k in (0, 7, 40):
        assert all(np.array_equal(mapped.train_message(k)[n], in_memory.train_message(k)[n]) for n in mapped.train_message(k))
        assert np.array_equal(again.train_message(k)["x"], in_memory.train_message(k)["x"])
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(mapped.val_set(), in_memory.val_set()))
    np.testing.assert_array_equal(other.sources[0].epoch_packs.array, bytes_in_memory.sources[0].epoch_packs)
    packs = next(path for path in (tmp_path / "cache").iterdir() if path.name in cached and "-packs-" in path.name)
    with open(packs, "r+b") as file:  # cut short, as a crash before the data reached the disk would leave it
        file.truncate(packs.stat().st_size // 2)
    rebuilt = stream(corpus_path, sampling="epoch")
    np.testing.assert_array_equal(rebuilt.sources[0].epoch_packs.array, memory_rows.epoch_packs)
    assert len(list((tmp_path / "cache").iterdir())) == 2 * len(cached)  # rebuilt in place, nothing left over


def test_fixed_packing_epochs_need_no_pack_table(corpus_path):
    s = stream(corpus_path, sampling="epoch", packing="fixed")
    assert isinstance(s.sources[0].epoch_packs, FixedPacks) and len(s.sources[0].epoch_packs) == s.meta.epoch_rows
    np.testing.assert_array_equal(s.sources[0].epoch_packs[np.array([0, 3])], [0, 3 * 64])
