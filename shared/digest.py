"""Short digests: the first 16 hex digits of a SHA-256, the fingerprint of a text corpus, of a
prepared folder's manifest and of a stream meta (64 bits: a name, not a security measure)."""

from __future__ import annotations

import hashlib

SHORT_DIGEST_HEX = 16  # hex digits kept


def short_hex(sha: hashlib._Hash) -> str:
    """A SHA-256 fed in pieces, as a short digest."""
    return sha.hexdigest()[:SHORT_DIGEST_HEX]


def short_sha256(data: bytes) -> str:
    """The short digest of ``data``."""
    return short_hex(hashlib.sha256(data))
