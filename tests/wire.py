"""Raw-socket helpers for tests that speak HTTP/1.1 by hand."""

from __future__ import annotations


async def read_until_close(stream, limit=1 << 20) -> bytes:
    """Everything up to the server's close (then ours, as a client does)."""
    data = b""
    while len(data) < limit:
        piece = await stream.receive_some(65536)
        if not piece:
            await stream.aclose()
            break
        data += piece
    return data
