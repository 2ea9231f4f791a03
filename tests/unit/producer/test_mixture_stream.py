"""Mixtures on the producer side: declaring sources, one tokenizer, per-source epochs, the val
set, exhaustion, and that message k is the same whoever computes it (docs/SPEC.md §2.9)."""

import argparse
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from producer.lines import CorpusError
from producer.mixture import declared_sources, default_name, parse_corpus_value
from producer.prepare import PrepareSettings, prepare
from producer.record import summarise
from producer.service import LiveSource
from producer.stream import BatchStream
from shared import settings
from shared.data_config import DataConfig
from shared.limits import MIN_VAL_ROWS_PER_SOURCE
from shared.recording import RecordingReader
from shared.wire import decode, encode

from helpers import ROOT

# Unique lines, so that rows can be mapped back to lines and lines to their source.
CODE = "".join(f"def f{i}(x): return x * {i}\n" for i in range(200))
PROSE = "".join(f"Line {i} of the play, spoken {'softly' * (i % 3)}.\n" for i in range(400))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    (folder / "code.txt").write_text(CODE)
    (folder / "prose.txt").write_text(PROSE)
    return folder


def mixed(corpora, **overrides) -> BatchStream:
    config = {"corpus": (f"code={corpora / 'code.txt'}:0.25", f"prose={corpora / 'prose.txt'}:0.75"),
              "block_size": 48, "rows_per_message": 8, **overrides}
    return BatchStream(DataConfig(**config))


def row_lines(stream: BatchStream, batch) -> list[list[str]]:
    """The lines of each row (the original tokens: labels where supervised)."""
    original = np.where(batch["y"] >= 0, batch["y"], batch["x"])
    tokens = stream.meta.tokens
    return [tokens.decode([t for t in row if t < stream.meta.mask_id]).splitlines(keepends=True) for row in original]


def test_corpus_values_are_read_from_both_ends_and_an_existing_path_wins(tmp_path):
    assert parse_corpus_value("code=prepared/code:0.3") == ("code", "prepared/code", 0.3)
    assert parse_corpus_value("prepared/prose") == (None, "prepared/prose", 1.0)
    assert parse_corpus_value("x=a:b:2") == ("x", "a:b", 2.0)
    assert parse_corpus_value("data/My File.txt:.5") == (None, "data/My File.txt", 0.5)
    odd = tmp_path / "a=b:1"
    odd.write_text("x\n")
    assert parse_corpus_value(str(odd)) == (None, str(odd), 1.0)
    assert parse_corpus_value(f"n={odd}") == ("n", str(odd), 1.0)
    assert default_name("data/Tiny Shakespeare.txt.gz") == "tiny-shakespeare"


def test_a_mixture_file_declares_the_same_sources(corpora, tmp_path):
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[[source]]\nname = "code"\npath = "{corpora / "code.txt"}"\nweight = 0.25\n\n'
                   f'[[source]]\npath = "{corpora / "prose.txt"}"\nweight = 0.75\nmax_epochs = 0\n')
    from_file = BatchStream(DataConfig(mixture=str(mix), block_size=48, rows_per_message=8))
    assert from_file.meta == mixed(corpora).meta
    mix.write_text('[[source]]\npath = "a"\nsize = 3\n[[source]]\npath = "b"\n')
    with pytest.raises(CorpusError, match="size"):
        declared_sources(DataConfig(mixture=str(mix)))
    with pytest.raises(ValueError, match="not both"):
        DataConfig(mixture=str(mix), corpus="x")


def test_the_flag_repeats_and_a_single_corpus_stays_a_single_corpus(corpora):
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, DataConfig)
    config = settings.from_namespace(DataConfig, parser.parse_args(
        ["--corpus", f"code={corpora / 'code.txt'}:0.25", "--corpus", f"prose={corpora / 'prose.txt'}:0.75"]))
    assert len(config.corpus) == 2 and mixed(corpora).meta == BatchStream(
        DataConfig(corpus=config.corpus, block_size=48, rows_per_message=8)).meta
    single = BatchStream(DataConfig(corpus=str(corpora / "code.txt"), block_size=48, rows_per_message=8))
    assert not single.meta.sources and "source" not in single.train_message(0)


def test_sources_with_different_tokenizers_are_refused_naming_both(corpora, tmp_path):
    for name, tokenizer in (("code", "bytes"), ("prose", "char")):
        prepare(PrepareSettings(corpus=str(corpora / f"{name}.txt"), out=str(tmp_path / name), tokenizer=tokenizer, workers=1))
    with pytest.raises(CorpusError, match=r"source code .* bytes .* source prose .* char"):
        BatchStream(DataConfig(corpus=(f"code={tmp_path / 'code'}", f"prose={tmp_path / 'prose'}")))
    # a text source takes the prepared source's tokenizer
    stream = BatchStream(DataConfig(corpus=(f"code={tmp_path / 'code'}", f"prose={corpora / 'prose.txt'}"),
                                    block_size=48, rows_per_message=8))
    assert stream.meta.tokenizer == "bytes" and [s.name for s in stream.meta.sources] == ["code", "prose"]


@pytest.mark.parametrize("sampling", ["random", "epoch"])
def test_every_message_decodes_rows_never_mix_sources_and_shares_are_exact(corpora, sampling):
    stream = mixed(corpora, sampling=sampling, policy="uniform")
    metas = {stream.meta.digest: stream.meta}
    sources = []
    for k in range(40):
        batch = stream.train_message(k)
        message = decode(encode(stream.meta, "train", "p", k, batch, k), metas)
        sources.append(message.tensors["source"])
        for s, lines in zip(batch["source"], row_lines(stream, batch)):
            assert all(line in (CODE, PROSE)[s] for line in lines)
    counts = np.cumsum(np.eye(2, dtype=int)[np.concatenate(sources)], axis=0)
    n = np.arange(1, len(counts) + 1)
    assert np.abs(counts - n[:, None] * np.array([0.25, 0.75])).max() < 1


def test_each_source_has_every_train_line_once_per_epoch_of_that_source(corpora):
    stream = mixed(corpora, sampling="epoch", policy="uniform")
    epoch_rows = [source.epoch_rows for source in stream.meta.sources]
    seen: list[list[str]] = [[], []]
    k = 0
    while len(seen[0]) < 2 * epoch_rows[0] or len(seen[1]) < 2 * epoch_rows[1]:
        batch = stream.train_message(k)
        for s, lines in zip(batch["source"], row_lines(stream, batch)):
            seen[s].append("".join(lines))
        k += 1
    for s, text in enumerate((CODE, PROSE)):
        train_lines = text.splitlines(keepends=True)[:round(0.9 * len(text.splitlines()))]
        for epoch in range(2):
            rows = seen[s][epoch * epoch_rows[s]:(epoch + 1) * epoch_rows[s]]
            assert sorted(line for row in rows for line in row.splitlines(keepends=True)) == sorted(train_lines)
        assert seen[s][:epoch_rows[s]] != seen[s][epoch_rows[s]:2 * epoch_rows[s]]  # its own shuffle each epoch


def test_message_k_is_the_same_whoever_computes_it_and_in_any_order(corpora):
    for sampling in ("random", "epoch"):
        ks = [0, 1, 2, 17, 5, 333, 3]
        one = mixed(corpora, sampling=sampling, producer_id="a")
        others = [mixed(corpora, sampling=sampling, producer_id=name) for name in ("b", "c")]
        for position, k in enumerate(ks):
            mine = one.train_message(k)
            theirs = others[position % 2].train_message(k)
            assert all(np.array_equal(mine[name], theirs[name]) for name in mine)


def test_the_val_set_holds_each_source_in_proportion_and_at_least_a_minimum(tmp_path):
    (tmp_path / "code.txt").write_text("".join(f"def f{i}(x): return x * {i}\n" for i in range(1000)))
    (tmp_path / "prose.txt").write_text("".join(f"Line {i} of the play.\n" for i in range(8000)))
    stream = mixed(tmp_path, corpus=(f"code={tmp_path / 'code.txt'}:0.05", f"prose={tmp_path / 'prose.txt'}:0.95"))
    sources = np.concatenate([batch["source"] for batch in stream.val_set()])
    assert len(stream.val_set()) == stream.meta.val_messages
    assert np.bincount(sources).tolist() == [MIN_VAL_ROWS_PER_SOURCE, 243]  # 0.05 * 256 = 12.8 is below the minimum
    assert (np.diff(sources) >= 0).all()  # source 0's rows, then source 1's
    for batch in stream.val_set():
        for s, lines in zip(batch["source"], row_lines(stream, batch)):
            assert all(line.startswith(("def", "Line")[s]) for line in lines)


def test_a_source_past_its_max_epochs_drops_out_and_the_end_is_no_message(corpora, tmp_path):
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[[source]]\nname = "code"\npath = "{corpora / "code.txt"}"\nmax_epochs = 1\n'
                   f'[[source]]\nname = "prose"\npath = "{corpora / "prose.txt"}"\nmax_epochs = 1\n')
    stream = BatchStream(DataConfig(mixture=str(mix), sampling="epoch", block_size=48, rows_per_message=8))
    end = stream.mixture.end
    assert end == sum(source.epoch_rows for source in stream.meta.sources)
    last = (end - 1) // 8
    assert stream.mixture.exhausted(end).all()
    live = LiveSource(stream)
    assert live.message("train", end // 8 + 1) is None
    if end % 8 == 0:
        assert live.message("train", last) is not None
    assert len(list(stream.train_batches())) == end // 8
    with pytest.raises(CorpusError, match="needs --sampling epoch"):
        BatchStream(DataConfig(mixture=str(mix)))


def test_record_and_inspect_show_each_sources_share(corpora, tmp_path):
    out = tmp_path / "m.lps"
    subprocess.run([sys.executable, "-m", "producer", "record", "--out", str(out), "--messages", "50",
                    "--corpus", f"code={corpora / 'code.txt'}:0.25", "--corpus", f"prose={corpora / 'prose.txt'}:0.75",
                    "--block-size", "48", "--rows-per-message", "8"], cwd=ROOT, check=True, capture_output=True)
    shown = json.loads(subprocess.run([sys.executable, "-m", "producer", "inspect", str(out)], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout)
    assert shown["sources"]["code"] == {"rows": 100, "share": 0.25, "target": 0.25, "val_rows": shown["sources"]["code"]["val_rows"]}
    assert shown["sources"]["prose"]["rows"] == 300 and shown["rejected"] == 0
    with RecordingReader(str(out)) as reader:
        assert summarise(reader)["sources"]["prose"]["share"] == 0.75


# sha256 prefixes of train messages 0, 1, 2, 7, 333, 4 (max-epochs: 0, 1, 89, 90, 333, 4; 89 holds
# the row where code drops out) and of the val set, as the producer made them before the mixed
# path packed a message's rows in one call: message k of a mixture may not change.
PINNED = {
    "bert-random": ("be38d95316f3dc6b", "080136b1cf416400"),
    "uniform-random": ("84c0094ec741f559", "e24e1ff74e9de0d7"),
    "stages-random": ("fc7c7460e58fbdd2", "c87d0484ae8982fb"),
    "bert-epoch": ("f138e931a6b82b89", "080136b1cf416400"),
    "stages-epoch": ("7f078c49c6787fe7", "c87d0484ae8982fb"),
    "fixed-random": ("1c2dbb2acec93abc", "59256e3ff3899e23"),
    "fixed-epoch": ("1ae68a72cf5202ea", "59256e3ff3899e23"),
    "three-random": ("bb42f8bfd6a57624", "b58da07a73367125"),
    "three-epoch": ("b45dbc943afa4f06", "df2f2f3c8196eb09"),
    "max-epochs": ("914e0e070ffbfa87", "e24e1ff74e9de0d7"),
}


def _digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            h.update(f"{name}{batch[name].dtype}{batch[name].shape}".encode())
            h.update(batch[name].tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(PINNED))
def test_mixture_messages_are_pinned(corpora, tmp_path, case):
    (tmp_path / "note.txt").write_text("".join(f"note {i}: {'x' * (i % 7)}\n" for i in range(150)))
    two = (f"code={corpora / 'code.txt'}:0.25", f"prose={corpora / 'prose.txt'}:0.75")
    # One message in most has no code row; some have every source.
    three = (f"code={corpora / 'code.txt'}:0.02", f"prose={corpora / 'prose.txt'}:0.9", f"note={tmp_path / 'note.txt'}:0.08")
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[[source]]\nname = "code"\npath = "{corpora / "code.txt"}"\nmax_epochs = 1\nweight = 0.25\n'
                   f'[[source]]\nname = "prose"\npath = "{corpora / "prose.txt"}"\nweight = 0.75\n')
    config = {
        "bert-random": {"corpus": two, "policy": "bert"},
        "uniform-random": {"corpus": two, "policy": "uniform"},
        "stages-random": {"corpus": two, "policy": "stages"},
        "bert-epoch": {"corpus": two, "policy": "bert", "sampling": "epoch"},
        "stages-epoch": {"corpus": two, "policy": "stages", "sampling": "epoch"},
        "fixed-random": {"corpus": two, "packing": "fixed"},
        "fixed-epoch": {"corpus": two, "packing": "fixed", "sampling": "epoch"},
        "three-random": {"corpus": three, "policy": "uniform"},
        "three-epoch": {"corpus": three, "sampling": "epoch", "supervise_sep": True},
        "max-epochs": {"mixture": str(mix), "sampling": "epoch", "policy": "uniform"},
    }[case]
    stream = BatchStream(DataConfig(block_size=48, rows_per_message=8, **config))
    ks = [0, 1, 89, 90, 333, 4] if case == "max-epochs" else [0, 1, 2, 7, 333, 4]
    if case == "max-epochs":
        assert len(stream.mixture.segments) == 2 and 89 * 8 < stream.mixture.segments[1].start < 90 * 8
    assert (_digest([stream.train_message(k) for k in ks]), _digest(stream.val_set())) == PINNED[case]


@pytest.mark.parametrize("policy", ["bert", "stages"])
@pytest.mark.parametrize("mixture", [False, True])
def test_every_message_carries_exactly_the_tensors_its_meta_names(corpora, policy, mixture):
    """``shared.wire.tensor_names`` (what the decoder demands and the trainer assembles) is what
    the producer sends, for train and val, with and without stages and sources."""
    from shared.wire import tensor_names

    stream = mixed(corpora, policy=policy) if mixture else BatchStream(DataConfig(corpus=str(corpora / "code.txt"), policy=policy))
    names = tensor_names(stream.meta)
    assert ("stage" in names) == (policy == "stages") and ("source" in names) == mixture
    assert all(tuple(sorted(batch)) == names for batch in [stream.train_message(0), stream.train_message(5), *stream.val_set()])


def test_the_readmes_mixture_file_is_declared_as_written(tmp_path):
    """README's ``mix.toml`` example, copied as is, declares code 0.2 and prose 0.8 under the default sampling."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Mixtures"):]
    text = section[section.index("```toml\n") + len("```toml\n"):]
    (tmp_path / "mix.toml").write_text(text[:text.index("```")], encoding="utf-8")
    specs = declared_sources(DataConfig(mixture=str(tmp_path / "mix.toml")))
    assert [(spec.name, spec.weight, spec.max_epochs) for spec in specs] == [("code", 0.2, 0), ("prose", 0.8, 0)]
    assert [spec.path for spec in specs] == [str(tmp_path / "prepared/code"), str(tmp_path / "prepared/prose")]
