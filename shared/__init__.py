"""What producer and trainer must agree on: vocabulary, stream meta, wire and recording formats.

This package depends on numpy and msgpack only (never on torch), so both sides can import it.
"""
