"""From the wire's numpy arrays to the training device's tensors (docs/SPEC.md §4).

Batches stay at the wire's small dtypes until they reach the device: :func:`host_tensor`
runs in the receive thread (on CUDA it copies into pinned memory), :func:`to_device` in the
training thread (a ``non_blocking`` copy, then the widening to :data:`WIDE_DTYPES`).
"""

from __future__ import annotations

import numpy as np
import torch

# The trainer's dtypes; on CUDA applied after the host-to-device copy.
WIDE_DTYPES = {"x": torch.int64, "y": torch.int64, "attention_mask": torch.int64, "mask_ratio": torch.float32, "stage": torch.int64,
               "source": torch.int64}
WIDE_NUMPY = {"x": np.int64, "y": np.int64, "attention_mask": np.int64, "mask_ratio": np.float32, "stage": np.int64, "source": np.int64}
# Pinned host buffers at the wire width (unsigned ids travel as signed bits, see host_tensor).
TORCH_OF_NUMPY = {np.dtype(np.int16): torch.int16, np.dtype(np.int32): torch.int32, np.dtype(np.uint8): torch.uint8,
                  np.dtype(np.float32): torch.float32}

HostBatch = dict[str, "np.ndarray | torch.Tensor"]


def host_tensor(device: torch.device, array: np.ndarray, vocab_size: int) -> np.ndarray | torch.Tensor:
    """The host side of a tensor, still at the wire width.

    CPU device: the numpy array itself (possibly a read-only view of the received frame).
    CUDA device: a copy in pinned memory. Unsigned ids go as the signed bits of the same width,
    which read as the same values while every id fits (``vocab_size``, checked by decode: uint32
    ids are below 2**31); uint16 ids of a vocabulary over 32768 are widened to int32 here.
    """
    if device.type != "cuda":
        return array
    if array.dtype == np.uint16:
        array = array.view(np.int16) if vocab_size <= 1 << 15 else array.astype(np.int32)
    elif array.dtype == np.uint32:
        array = array.view(np.int32)
    pinned = torch.empty(array.shape, dtype=TORCH_OF_NUMPY[array.dtype], pin_memory=True)
    pinned.numpy()[...] = array
    return pinned


def to_device(device: torch.device, host: HostBatch) -> dict[str, torch.Tensor]:
    """Moves the host tensors to ``device``, then widens them to :data:`WIDE_DTYPES`.

    On CPU the widening is numpy's ``astype`` (a copy, so the result never aliases a received
    frame; torch's own CPU conversion spawns intra-op threads, which a busy host makes slow);
    on CUDA it happens on the device after a ``non_blocking`` copy from pinned memory.
    """
    if device.type != "cuda":
        return {name: torch.from_numpy(array.astype(WIDE_NUMPY[name])) for name, array in host.items()}
    return {name: tensor.to(device, non_blocking=True).to(WIDE_DTYPES[name]) for name, tensor in host.items()}
