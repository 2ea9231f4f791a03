"""The producer: corpus loading, line-aligned packing, corruption, and the stream of batches.

Everything here is numpy (never torch, never ``trainer``). ``python -m producer`` is the CLI.
"""
