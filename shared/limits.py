"""The names and limits producer and trainer must agree on, declared once (docs/SPEC.md §2, §3).

Both sides import these; neither keeps a copy. Changing one is a change of the contract.
"""

from __future__ import annotations

import numpy as np

PACKINGS = ("lines", "fixed")  # docs/SPEC.md §2.3, §2.4
SAMPLINGS = ("random", "epoch")  # docs/SPEC.md §2.3
DEFAULT_MASK_FRACTIONS = (0.8, 0.1, 0.1)  # [MASK], random token, unchanged

MAX_BLOCK_SIZE = 65536  # tokens per row
MAX_ROWS_PER_MESSAGE = 4096
MAX_STAGES = 256  # stage ids travel as uint8
MAX_VAL_ROWS = 256  # the fixed val set is cut at this many rows
MAX_PRODUCER_ID_CHARS = 128
COUNT_DTYPE = np.dtype("<u8")  # token_counts: one little-endian uint64 per base id
MAX_SOURCES = 64  # sources of one mixture (docs/SPEC.md §2.9); source ids travel as uint8
MAX_MIXTURE_PERIOD = 1 << 16  # rows after which a mixture's assignment repeats: the sum of its integer weight parts
# Source-row steps of Tijdeman's rule a mixture's assignment may take to compute (a period per
# segment, P x m steps each): as many as one period of the most sources at the longest period, so a
# meta whose max_epochs would start many long segments costs no more than the largest one-segment mixture.
MAX_MIXTURE_STEPS = MAX_MIXTURE_PERIOD * MAX_SOURCES
MIN_VAL_ROWS_PER_SOURCE = 32  # val rows each source of a mixture gets at least (as far as its val lines go)
# Ids travel as uint16 or uint32 and labels as int16 or int32, the smallest that holds them
# (docs/SPEC.md §3): the whole vocabulary, specials included, must fit int32 labels.
MAX_VOCAB_SIZE = (1 << 31) - 1
