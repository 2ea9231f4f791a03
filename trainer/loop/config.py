"""Training-loop settings (``python -m trainer``'s ``training loop`` flags), declared once.

The model's own settings are :class:`trainer.model.transformer.ModelConfig`. Times are in
optimizer steps unless a name says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import settings
from shared.settings import at_least, setting
from trainer.model.losses import LOSS_WEIGHTINGS

DEVICES = ("auto", "cpu", "cuda")
RESUME_MODES = ("never", "auto", "always")


@dataclass(frozen=True)
class TrainConfig:
    """How the trainer trains. ``out_dir`` is required; ``data_timeout`` is the resolved
    ``--data-timeout`` (seconds without a train batch before :meth:`Trainer.run` raises
    TimeoutError; None = wait forever), set by the CLI, not a flag of its own."""

    out_dir: str | None = setting(None, "checkpoint and metrics.jsonl go here", metavar="DIR")
    batch_size: int = setting(32, "rows per training batch", metavar="B", check=at_least(1))
    max_iters: int = setting(2000, "optimizer steps to train", metavar="N", check=at_least(1))
    eval_interval: int = setting(100, "steps between evaluations (and checkpoints)", metavar="N", check=at_least(1))
    eval_batches: int = setting(0, "first N val batches; 0 = the whole val set", metavar="N", check=at_least(0))
    log_interval: int = setting(10, "steps between log lines", metavar="N", check=at_least(1))
    device: str = setting("auto", "where to train", choices=DEVICES)
    seed: int = setting(0, "torch seed (initialization, dropout)", check=at_least(0))
    lr: float = setting(2e-3, "peak learning rate", check=at_least(0))
    min_lr: float = setting(2e-4, "learning rate at the end of the cosine decay", check=at_least(0))
    warmup_iters: int = setting(100, "steps of linear warm-up", metavar="N", check=at_least(0))
    lr_decay_iters: int = setting(0, "step at which the cosine reaches min-lr; 0 = max-iters", metavar="N", check=at_least(0))
    grad_clip: float = setting(1.0, "max global gradient norm; 0 = no clipping", check=at_least(0))
    weight_decay: float = setting(0.1, "AdamW weight decay of matrices and embeddings", check=at_least(0))
    beta1: float = setting(0.9, "AdamW beta1: decay of the gradient's running mean", check=at_least(0))
    beta2: float = setting(0.99, "AdamW beta2: decay of the squared gradient's running mean", check=at_least(0))
    eval_samples: int = setting(2, "samples written at each eval (the same prompts every time; 0 = off)", metavar="N",
                                check=at_least(0))
    eval_sample_length: int = setting(48, "tokens per eval sample, [SEP] included", metavar="L", check=at_least(10))
    eval_sample_budget: float = setting(0.05, "eval samples take at most this fraction of an eval's time (it sets their "
                                              "unmasking steps)", check=at_least(0))
    loss_weighting: str = setting("none", "none: mean over supervised positions; inverse-t: rows weighted by 1/mask_ratio",
                                  choices=LOSS_WEIGHTINGS)
    compile: bool = setting(False, "torch.compile the model for training")
    threads: int = setting(0, "torch CPU threads; 0 = torch's default (one per core). Leave cores to producers that share "
                              "the machine: oversubscribed CPU steps slow down many times over", metavar="N",
                           check=at_least(0))
    resume: str = setting("never", "continue from OUT_DIR/ckpt.pt: always (the bare flag), auto (when there is one) or never",
                          choices=RESUME_MODES, const="always")
    data_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.out_dir is None:
            raise ValueError("--out-dir is required")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting {self.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}")
        if self.resume not in RESUME_MODES:
            raise ValueError(f"resume {self.resume!r} is not one of {RESUME_MODES}")
        settings.check_fields(self)
