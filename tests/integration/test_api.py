"""trainer.api: the stream for your own model and loop, with real producers on 127.0.0.1 (docs/API.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest
import torch
from torch.utils.data import DataLoader

from shared.vocab import IGNORE_INDEX
from trainer.api import HF_IGNORE_INDEX, Stream
from trainer.diagnostics.floor import context_free_floor

from helpers import ROOT
from helpers.processes import TINY_DATA, free_port

EXAMPLE_TINY = ["--layers", "1", "--width", "32", "--block-size", "32", "--batch-size", "8", "--eval-every", "2",
                "--warmup-steps", "1", "--threads", "1"]


def producer(children, endpoint: str, *extra: str):
    return children.start("producer", "run", "--connect", endpoint, *TINY_DATA, *extra)


def get_json(port: int, path: str = "/diagnostics") -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_a_stream_gives_batches_the_val_set_and_what_it_knows(children):
    with Stream("tcp://127.0.0.1:*", batch_size=8, wait_timeout=60) as stream:
        producer(children, stream.endpoint)
        info = stream.info
        assert (info.block_size, info.vocab_size, info.ignore_index) == (32, info.meta.vocab_size, IGNORE_INDEX)
        assert (info.mask_id, info.sep_id, info.pad_id) == (info.meta.mask_id, info.meta.sep_id, info.meta.pad_id)
        assert info.context_free_floor == pytest.approx(context_free_floor(info.meta, "val")) and info.context_free_floor > 0
        batch = stream.next(timeout=30)
        assert set(batch) == {"x", "y", "attention_mask", "mask_ratio"}
        assert batch["x"].shape == (8, 32) and batch["x"].dtype == torch.int64
        row = batch["x"][0][batch["attention_mask"][0] == 1]
        assert isinstance(info.tokenizer.decode(row.tolist()), str)
        val = stream.val_batches()
        assert val and all(b["x"].shape[1] == 32 for b in val)
        assert stream.state_dict() == {"cursor": {"position": 1, "rows_used": 0, "world": 1}}
        stream.hf_names = True
        named = stream.next(timeout=30)
        assert set(named) == {"input_ids", "labels", "attention_mask", "mask_ratio"}
        supervised = named["labels"] != HF_IGNORE_INDEX
        assert supervised.any() and (named["labels"][supervised] < info.mask_id).all()
        assert set(stream.val_batches()[0]) == set(named)


def take(children, state: dict | None, count: int) -> tuple[list[torch.Tensor], dict]:
    """``count`` batches' ``x`` from a fresh stream and producer, started at ``state``; and the state after them."""
    with Stream("tcp://127.0.0.1:*", batch_size=8, wait_timeout=60) as stream:
        process = producer(children, stream.endpoint)
        if state is not None:
            stream.load_state_dict(state)
        batches = [stream.next(timeout=30)["x"] for _ in range(count)]
        saved = stream.state_dict()
    process.stop()
    return batches, saved


def test_the_saved_position_resumes_the_data_exactly(children):
    """A user's checkpoint with stream.state_dict(): the resumed stream continues with the very batches."""
    whole, _ = take(children, None, 5)
    first, saved = take(children, None, 3)
    rest, _ = take(children, saved, 2)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, whole))
    assert not torch.equal(whole[3], whole[0])


def test_the_dataset_feeds_a_dataloader_in_batches_and_in_rows(children):
    with Stream("tcp://127.0.0.1:*", batch_size=8, wait_timeout=60) as stream:
        producer(children, stream.endpoint)
        loader = DataLoader(stream.dataset(), batch_size=None)
        batch = next(iter(loader))
        assert batch["x"].shape == (8, 32)
        rows = iter(stream.dataset(rows=True))
        row = next(rows)
        assert row["x"].shape == (32,) and row["mask_ratio"].shape == ()
        stacked = DataLoader(stream.dataset(rows=True), batch_size=4)
        assert next(iter(stacked))["attention_mask"].shape == (4, 32)


def test_a_foreign_loop_serves_the_diagnostics_with_its_loss_and_the_floor(children):
    with Stream("tcp://127.0.0.1:*", batch_size=8, wait_timeout=60) as stream:
        producer(children, stream.endpoint)
        with stream.serve_diagnostics(port=0, warmup_steps=2) as reporter:
            for step in range(1, 4):
                stream.next(timeout=30)
                reporter.report(step, loss=5.0 - step)
            reporter.report(3, val_loss=stream.info.context_free_floor + 0.01)
            diagnostics = get_json(reporter.port)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{reporter.port}/metrics", timeout=10).read().decode()
            page = urllib.request.urlopen(f"http://127.0.0.1:{reporter.port}/", timeout=10).read().decode()
        assert diagnostics["status"] == "training" and diagnostics["step"] == 3
        loss = diagnostics["loss"]
        assert loss["train"] == 2.0 and loss["val"] == pytest.approx(stream.info.context_free_floor + 0.01)
        assert loss["context_free_floor_val"] == pytest.approx(stream.info.context_free_floor)
        assert diagnostics["stream"]["consumed_messages"] >= 3 and diagnostics["throughput"]["tokens_per_s"] > 0
        assert diagnostics["batch"]["valid_len"]["max"] <= 32
        blind = next(alarm for alarm in diagnostics["alarms"] if alarm["name"] == "context_blind")
        assert blind["active"] and "within 0.1 nats of the floor" in blind["explanation"]
        assert "linepack" in metrics and "<html" in page.lower()


def readme_loop(port: int) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- readme-loop -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.splitlines()) < 25, "the README promises a loop under 25 lines"
    return code.replace("tcp://127.0.0.1:5555", f"tcp://127.0.0.1:{port}").replace("port=8000", "port=0")


def test_the_readme_loop_runs_as_written(children, tmp_path):
    port = free_port()
    script = tmp_path / "loop.py"
    script.write_text(readme_loop(port) + "\nprint(step, loss.item())\n")
    producer(children, f"tcp://127.0.0.1:{port}")
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    step, loss = done.stdout.split()
    assert int(step) == 100 and float(loss) < 3.5, "the model learns (the untrained loss is ~4.2 nats)"


@pytest.mark.parametrize("loop", ["plain", "hf"])
def test_the_hugging_face_example_trains_and_reports(loop):
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "examples/hf_masked_lm.py", "--corpus", "data/tinyshakespeare.txt",
                           "--max-steps", "4", "--http-port", "0", "--loop", loop, *EXAMPLE_TINY], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["loop"] == loop and result["model"] == "modernbert"
    assert 0 < result["context_free_floor"] < result["val_loss"] < 6, "4 steps: still above the floor"


def test_curve_needs_both_key_files():
    with pytest.raises(ValueError, match="needs both curve_secret_key and curve_authorized_keys"):
        Stream("tcp://127.0.0.1:*", curve_secret_key="server.key_secret")
