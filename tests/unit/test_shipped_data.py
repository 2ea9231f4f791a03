"""The corpus the README's Shakespeare figures and the tests use ships with the repository, its source named."""

from __future__ import annotations

import hashlib

from helpers import ROOT, SHAKESPEARE


def test_tinyshakespeare_is_shipped_with_its_source_named():
    readme = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() in readme
    assert "https://github.com/karpathy/char-rnn" in readme and "public domain" in readme
    assert SHAKESPEARE.read_text(encoding="utf-8").startswith("First Citizen:\n")
