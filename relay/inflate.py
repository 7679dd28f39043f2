"""Undoing a body's Content-Encoding within a size limit: the client's request (relay.intake) and the
bodies a model-call capture records (relay.capture_record)."""

import zlib

# zlib's window bits: gzip framing, or zlib framing (what "deflate" means in HTTP; some send it raw).
WINDOW_BITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


class TooLarge(Exception):
    """The decompressed body is over the limit (a zip bomb included)."""


def inflate(raw: bytes, window_bits: int, limit: int, partial: bool = False) -> bytes:
    """`raw` decompressed, at most `limit` bytes of it or TooLarge; zlib.error when it is not valid data of
    that coding, or when it ends early unless `partial` (the beginning of a body is all there is)."""
    decoder = zlib.decompressobj(window_bits)
    try:
        body = decoder.decompress(raw, limit + 1)
    except zlib.error:
        if window_bits != 15:
            raise
        decoder = zlib.decompressobj(-15)  # "deflate" sent without its zlib header, as some clients do
        body = decoder.decompress(raw, limit + 1)
    if len(body) > limit or decoder.unconsumed_tail:
        raise TooLarge
    if not decoder.eof and not partial:
        raise zlib.error("truncated")
    return body
