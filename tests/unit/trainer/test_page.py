"""The live page: self-contained (no external URL), served at /, and rendered by headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from trainer.diagnostics.http import PAGE, create_app, serve_in_thread
from trainer.diagnostics.state import Diagnostics

from helpers.streams import FakeConsumer, make_trainer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900", "--virtual-time-budget=5000"]


def test_page_is_self_contained():
    page = PAGE.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "//" + "cdn" not in page
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I) and "@import" not in page and "url(" not in page
    assert "<canvas" in page and "/diagnostics" in page and "/history" in page


def test_page_is_served_at_the_root():
    server = serve_in_thread(create_app(Diagnostics()), "127.0.0.1", 0)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/", timeout=10)
    finally:
        server.stop()
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == PAGE.read_text(encoding="utf-8")


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG (what Chromium writes) to (H, W, C) uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, header = 8, b"", None
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        chunk = data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        offset += 12 + length
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and color_type in (2, 6) and interlace == 0, header
    channels = 3 if color_type == 2 else 4
    stride = width * channels
    raw = zlib.decompress(idat)
    image = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.int64)
    for row in range(height):
        kind = raw[row * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, row * (stride + 1) + 1).astype(np.int64)
        if kind == 1:  # Sub: a running sum per channel
            line = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) % 256
        elif kind == 2:
            line = (line + previous) % 256
        elif kind in (3, 4):  # Average / Paeth depend on the decoded left pixel: byte by byte
            out, up = line.tolist(), previous.tolist()
            for i in range(stride):
                left = out[i - channels] if i >= channels else 0
                if kind == 3:
                    predictor = (left + up[i]) // 2
                else:
                    upper_left = up[i - channels] if i >= channels else 0
                    estimate = left + up[i] - upper_left
                    distances = (abs(estimate - left), abs(estimate - up[i]), abs(estimate - upper_left))
                    predictor = (left, up[i], upper_left)[distances.index(min(distances))]
                out[i] = (out[i] + predictor) % 256
            line = np.array(out, dtype=np.int64)
        image[row] = line
        previous = line
    return image.reshape(height, width, channels)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    consumer = FakeConsumer()
    diagnostics = Diagnostics(consumer, probe_interval=10, no_context_positions=64)
    make_trainer(tmp_path_factory.mktemp("run"), consumer, diagnostics).run()
    server = serve_in_thread(create_app(diagnostics), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.port}/"
    server.stop()


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, timeout=90, cwd=profile.parent)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); the render test needs it")
def test_headless_chromium_draws_every_chart(served_run, tmp_path):
    dom = chromium(served_run, tmp_path / "profile-dom", "--dump-dom").stdout.decode()
    assert 'data-rendered="charts"' in dom, dom[-2000:]
    assert "step 30" in dom and ("No alarms" in dom or "since step" in dom)  # the alarms banner
    assert "<td>p0</td>" in dom  # the producers table
    samples = httpx.get(served_run + "diagnostics", timeout=10).json()["samples"]
    assert samples and all(s["step"] == 30 for s in samples), "the live samples of the last eval"
    panel = dom.split('id="samples"', 1)[1].split("</section>", 1)[0]
    assert panel.count("<b>") == len(samples) and "unmasking steps" in panel and "step 30 · seed 0" in panel
    for sample in samples:
        assert html.escape(sample["prompt"], quote=False) in panel
    screenshot = tmp_path / "page.png"
    result = chromium(served_run, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert screenshot.exists(), result.stderr.decode()[-2000:]
    pixels = png_pixels(screenshot.read_bytes())[..., :3]
    assert pixels.shape[:2] == (900, 1200)
    colors = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colors) > 200, f"only {len(colors)} colors: the page looks blank"
    # The chart series colours are on screen (train loss blue, val orange).
    for rgb in ((0x25, 0x63, 0xEB), (0xEA, 0x58, 0x0C)):
        assert (np.abs(pixels.astype(int) - rgb).sum(axis=-1) < 30).sum() > 50, rgb
