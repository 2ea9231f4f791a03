"""CUDA path checks for a GPU machine; prints one JSON line.

    python benchmarks/device/cuda_check.py [--device cpu]

``--device cpu`` runs the same checks on the CPU (no pinning; bf16 autocast on the CPU): the
test suite's smoke test of this script, so it cannot rot between GPU loans.

1. ``DatasetConsumer(device="cuda")`` fed by a real ``python -m producer run`` process: host
   buffers are pinned, batches arrive as int64 on the GPU, and their rows equal the recorded
   messages (the consumer's own recording of what it handed out).
2. SDPA with ``trainer.model.transformer.key_padding_mask`` against a hand-written masked softmax on the GPU,
   in fp32 and under bf16 autocast (max absolute difference).

A training run on CUDA (bf16 autocast, the start-up mask self-test) is ``python -m trainer
--device cuda ...`` itself; docs/BENCHMARKS.md lists the commands and results.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from shared.recording import RecordingReader  # noqa: E402
from shared.wire import WireError, decode_stream  # noqa: E402
from trainer.data.consumer import DatasetConsumer  # noqa: E402
from trainer.data.device import host_tensor  # noqa: E402
from trainer.model.transformer import key_padding_mask  # noqa: E402


def check_consumer(record_path: str, device: torch.device) -> dict:
    with DatasetConsumer("tcp://127.0.0.1:*", 24, device=device, record_path=record_path) as consumer:
        producer = subprocess.Popen([sys.executable, "-m", "producer", "run", "--connect", consumer.endpoint, "--block-size", "256",
                                     "--rows-per-message", "16", "--policy", "uniform"])
        consumer.wait_for_val_set(timeout=30)
        batches = [consumer.next_batch(timeout=30) for _ in range(8)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        host = host_tensor(device, np.zeros((2, 3), np.uint16), consumer.meta.vocab_size)
        pinned = bool(host.is_pinned()) if device.type == "cuda" else None
        producer.terminate()
        producer.wait(timeout=30)
    with RecordingReader(record_path) as reader:
        messages = [m for m in decode_stream(reader) if not isinstance(m, WireError)]
    sent_rows = np.concatenate([m.tensors["x"] for m in messages if m.split == "train"])
    got_rows = torch.cat([batch["x"] for batch in batches]).cpu().numpy()
    return {
        "pinned": pinned,
        "dtypes": {name: str(tensor.dtype) for name, tensor in batches[0].items()},
        "devices": sorted({str(tensor.device) for tensor in batches[0].values()}),
        "consumer_rows_equal_recording": bool(np.array_equal(got_rows, sent_rows[: len(got_rows)].astype(np.int64))),
    }


def check_sdpa(device: torch.device) -> dict:
    torch.manual_seed(0)
    B, H, T, D = 3, 2, 37, 16
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    attention_mask = torch.ones(B, T, dtype=torch.int64, device=device)
    attention_mask[0, 20:] = 0
    attention_mask[2, 5:] = 0
    attend = key_padding_mask(attention_mask)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    reference = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf")).softmax(-1) @ v
    fp32 = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    return {
        "sdpa_vs_hand_max_abs": float((fp32 - reference).abs().max()),
        "sdpa_bf16_vs_hand_max_abs": float((bf16.float() - reference).abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (its smoke test)")
    device = torch.device(parser.parse_args(argv).device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as folder:
        result.update(check_consumer(os.path.join(folder, "stream.lps"), device))
    result.update(check_sdpa(device))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
