"""``trainer.api.hf_batch``: Hugging Face's names for x / y / attention_mask, every other tensor kept."""

import torch

from shared.vocab import IGNORE_INDEX
from trainer.api import hf_batch


def test_hf_names_rename_three_tensors_and_keep_every_other_one():
    batch = {"x": torch.tensor([[5, 6]]), "y": torch.tensor([[5, IGNORE_INDEX]]), "attention_mask": torch.tensor([[1, 1]]),
             "mask_ratio": torch.tensor([0.5]), "stage": torch.tensor([1]), "source": torch.tensor([0])}
    named = hf_batch(batch, IGNORE_INDEX)
    assert set(named) == {"input_ids", "labels", "attention_mask", "mask_ratio", "stage", "source"}
    assert named["labels"].tolist() == [[5, -100]] and named["input_ids"] is batch["x"]
    assert named["source"] is batch["source"] and named["stage"] is batch["stage"]
