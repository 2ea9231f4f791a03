"""python -m trainer.export: safetensors + config.json + tokenizer.json, loaded back by trainer.sample and plain PyTorch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from trainer.loop.checkpoint import Checkpoint, load_model, save_checkpoint
from trainer.model import exported
from trainer.model.transformer import BidirectionalTransformer

from helpers import ROOT
from helpers.streams import TINY_MODEL, SyntheticStream


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory holding a checkpoint of a seeded model on a char stream."""
    folder = tmp_path_factory.mktemp("run")
    meta = SyntheticStream(block_size=32).meta
    torch.manual_seed(3)
    model = BidirectionalTransformer(TINY_MODEL.for_stream(meta))
    save_checkpoint(folder / "ckpt.pt", Checkpoint(model=model.state_dict(), optimizer={}, step=42,
                                                   model_config=model.config, meta=meta, sample_length=24))
    return folder


def python(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def sample_json(source) -> dict:
    done = python("-m", "trainer.sample", "--run", source, "--num-samples", 3, "--seed", 7, "--steps", 8, "--json",
                  "--device", "cpu")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_export_samples_the_same_text_as_its_run(run, tmp_path):
    done = python("-m", "trainer.export", "--run", run, "--out", tmp_path / "export")
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    direct, from_export = sample_json(run), sample_json(tmp_path / "export")
    assert from_export["samples"] == direct["samples"] and len(direct["samples"]) == 3
    assert from_export["settings"]["length"] == 24 and from_export["settings"]["step_of_checkpoint"] == 42
    assert b"pickle" not in (tmp_path / "export" / "model.safetensors").read_bytes()[:200]


def test_the_export_loads_with_the_plain_pytorch_lines_of_the_docs(run, tmp_path):
    exported.write_export(str(tmp_path), *_trained(run))
    api = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    snippet = re.search(r"<!-- export-load -->\n```python\n(.*?)```", api, re.S).group(1).replace("DIR", str(tmp_path))
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - the documented lines, as written
    original = load_model(run).model.state_dict()
    loaded = scope["model"].state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[name], original[name]) for name in original)


def _trained(run):
    trained = load_model(run)
    return trained.model, trained.meta, trained.step, trained.sample_length


@pytest.mark.parametrize("kind, vocab", [("char", "ab\ncd"), ("bytes", ""), ("hf", '{"model": {"type": "BPE"}}')])
def test_the_tokenizer_file_gives_back_the_vocab(kind, vocab):
    text = exported.tokenizer_file(type("Meta", (), {"tokenizer": kind, "vocab": vocab})())
    assert exported.vocab_from_file(kind, text) == vocab
    if kind == "hf":
        assert text == vocab, "the Hugging Face tokenizers file itself"


def test_a_damaged_export_is_a_value_error_naming_the_file(run, tmp_path):
    exported.write_export(str(tmp_path), *_trained(run))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unusable weights .*model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="unusable export .*config.json"):
        load_model(tmp_path)
    done = python("-m", "trainer.export", "--run", tmp_path / "nothing", "--out", tmp_path / "out")
    assert done.returncode == 2 and "export: no checkpoint at" in done.stderr
