"""Content-Encoding decoded as a body arrives, never producing more than the room it is given.

photoprep asks for bodies as they are (no Accept-Encoding), but a server may encode anyway. A
`Decoder` turns each received chunk into decoded bytes in steps bounded by the room left under
``download.max_bytes`` (zlib's ``max_length``, brotli's ``output_buffer_limit``), so a small
compressed body cannot expand in memory: `TooLarge` is raised as soon as the decoded bytes pass
the limit. gzip, deflate (zlib or raw) and br are decoded; another encoding is refused.
"""

from __future__ import annotations

import zlib
from typing import Any

import brotli

__all__ = ["Decoder", "TooLarge"]


class TooLarge(Exception):
    """The body decodes to more than max_bytes."""


class Decoder:
    """Streams a body through its Content-Encoding; never produces more than the room it is given."""

    def __init__(self, encoding: str):
        self.name = encoding.strip().lower()
        self.z: Any = None
        self.br: Any = None
        if self.name in ("gzip", "x-gzip"):
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.name == "deflate":
            self.z = zlib.decompressobj(zlib.MAX_WBITS)
            self.first = True
        elif self.name == "br":
            self.br = brotli.Decompressor()
        elif self.name not in ("", "identity"):
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    def feed(self, data: bytes, room: int) -> list[bytes]:
        """The decoded bytes of `data`; TooLarge as soon as they would pass `room`."""
        if self.z is None and self.br is None:
            if len(data) > room:
                raise TooLarge
            return [data]
        parts: list[bytes] = []
        while True:
            out = self._step(data, room + 1)
            data = b""
            room -= len(out)
            if room < 0:
                raise TooLarge
            if out:
                parts.append(out)
            if not self._pending():
                return parts

    def finish(self, room: int) -> list[bytes]:
        """What is left once the body has ended; ValueError when the encoded stream is incomplete."""
        if self.z is not None:
            out = self.z.flush(room + 1)
            if len(out) > room:
                raise TooLarge
            if self.name != "deflate" and not self.z.eof:
                raise ValueError("the compressed stream ends early")
            return [out]
        if self.br is not None and not self.br.is_finished():
            raise ValueError("the compressed stream ends early")
        return []

    def _step(self, data: bytes, limit: int) -> bytes:
        if self.br is not None:
            return bytes(self.br.process(data, output_buffer_limit=limit))
        if not data:
            data = self.z.unconsumed_tail
        try:
            out = self.z.decompress(data, limit)
        except zlib.error:
            if self.name != "deflate" or not self.first:
                raise
            self.z = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send it
            out = self.z.decompress(data, limit)
        if self.name == "deflate":
            self.first = False
        return bytes(out)

    def _pending(self) -> bool:
        if self.br is not None:
            return not self.br.can_accept_more_data()
        return bool(self.z.unconsumed_tail)
