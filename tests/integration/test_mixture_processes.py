"""A mixture through real producer processes on 127.0.0.1 (docs/SPEC.md §2.9): the batches a
trainer's consumer assembles are the same with one producer as with three, row for row and
source for source, and equal the stream's own train messages k = 0, 1, ... (the pure function)."""

from __future__ import annotations

import numpy as np
import pytest

from producer.stream import BatchStream
from shared.data_config import DataConfig
from trainer.data.consumer import DatasetConsumer

BLOCK, ROWS, BATCH, BATCHES = 32, 8, 12, 10  # batches cut across messages: 120 rows = 15 messages


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture")
    (folder / "code.txt").write_text("".join(f"def f{i}(x): return x * {i}\n" for i in range(300)))
    (folder / "prose.txt").write_text("".join(f"the {i % 7} quick foxes jump over {i} lazy dogs\n" for i in range(300)))
    return [f"code={folder / 'code.txt'}:0.3", f"prose={folder / 'prose.txt'}:0.7"]


def data_flags(sources):
    flags = ["--block-size", BLOCK, "--rows-per-message", ROWS, "--seed", 5, "--policy", "uniform"]
    for source in sources:
        flags += ["--corpus", source]
    return [str(flag) for flag in flags]


def batches_from(children, sources, producers: int) -> dict[str, np.ndarray]:
    with DatasetConsumer("tcp://127.0.0.1:*", BATCH) as consumer:
        for p in range(producers):
            children.start("producer", "run", "--connect", consumer.endpoint, "--producer-id", f"p{p}",
                           *data_flags(sources), name=f"producer {p}")
        consumer.wait_for_val_set(timeout=60)
        batches = [consumer.next_batch(timeout=60) for _ in range(BATCHES)]
        names = [source.name for source in consumer.meta.sources]
    children.close()
    rows = {name: np.concatenate([batch[name].numpy() for batch in batches]) for name in ("x", "y", "source")}
    assert names == ["code", "prose"]
    return rows


@pytest.mark.slow
def test_a_mixture_is_the_same_batches_with_one_producer_or_three(children, sources):
    one = batches_from(children, sources, 1)
    three = batches_from(children, sources, 3)
    for name in ("x", "y", "source"):
        np.testing.assert_array_equal(one[name], three[name])
    stream = BatchStream(DataConfig(corpus=tuple(sources), block_size=BLOCK, rows_per_message=ROWS, seed=5, policy="uniform"))
    messages = [stream.train_message(k) for k in range(BATCH * BATCHES // ROWS)]
    np.testing.assert_array_equal(one["x"], np.concatenate([m["x"] for m in messages]).astype(np.int64))
    np.testing.assert_array_equal(one["source"], np.concatenate([m["source"] for m in messages]).astype(np.int64))
    # Both sources are there, in the weights' proportion within one row (Tijdeman's bound).
    shares = np.bincount(one["source"], minlength=2)
    assert abs(shares[0] - 0.3 * len(one["source"])) < 1 and shares.sum() == BATCH * BATCHES
