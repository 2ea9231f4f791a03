"""Which stream the consumer trains on: the pinned meta, and the foreign metas it has seen.

The first meta the consumer accepts **pins** the stream (docs/SPEC.md §3). Every later message
must carry the same meta (by digest); a different one is rejected with a line naming the first
differing field and both values. Metas of foreign streams are remembered (at most
:data:`MAX_FOREIGN_METAS` of them and :data:`MAX_FOREIGN_META_BYTES` by ``StreamMeta.nbytes``, the
oldest forgotten first) so their batches, which carry only a digest, can be named too.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

from shared.meta import StreamMeta

MAX_FOREIGN_METAS = 16
MAX_FOREIGN_META_BYTES = 64 << 20


class MetaPins:
    def __init__(self, max_foreign: int = MAX_FOREIGN_METAS, max_foreign_bytes: int = MAX_FOREIGN_META_BYTES) -> None:
        self.meta: StreamMeta | None = None
        self.max_foreign = max_foreign
        self.max_foreign_bytes = max_foreign_bytes
        self._known: collections.OrderedDict[str, StreamMeta] = collections.OrderedDict()

    @property
    def known(self) -> Mapping[str, StreamMeta]:
        """Digest -> meta of every stream seen (the pinned one and the remembered foreign ones)."""
        return self._known

    def foreign_bytes(self) -> int:
        """Bytes (``StreamMeta.nbytes``) of the remembered foreign metas."""
        return sum(meta.nbytes for digest, meta in self._known.items() if digest != self.meta.digest)

    def pin(self, meta: StreamMeta) -> None:
        self.meta = meta
        self._known[meta.digest] = meta

    def mismatch(self, meta: StreamMeta, producer_id: str) -> str | None:
        """None when ``meta`` is the pinned stream's; else the log line that names the difference
        (and ``meta`` is remembered as a foreign stream)."""
        if meta is self.meta or meta.digest == self.meta.digest:
            return None
        self._known[meta.digest] = meta
        self._known.move_to_end(meta.digest)
        while len(self._known) > 1 and (len(self._known) > self.max_foreign + 1 or self.foreign_bytes() > self.max_foreign_bytes):
            oldest = next(digest for digest in self._known if digest != self.meta.digest)
            del self._known[oldest]
        differences = self.meta.differences(meta)
        name, mine, theirs = differences[0]
        also = f" (also differs: {', '.join(field for field, _, _ in differences[1:])})" if len(differences) > 1 else ""
        return f"producer {producer_id!r}: field {name} is {theirs!r:.200}, the pinned stream has {mine!r:.200}{also}"
