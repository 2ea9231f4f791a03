"""The training loop: start-up and resume, steps, evaluation, checkpoints, data-parallel ranks."""
