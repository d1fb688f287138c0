"""A secret share on the control channel: its meta and its content as one byte string, never SPU's chunks.

SPU serialises a share as a ValueMeta and a list of ValueChunks (each: the value's total size, an offset, some
bytes). SPU 0.9.5's ``Value::fromProto`` copies each chunk to its offset before it checks the total, so chunks from
an untrusted client could write past the value's buffer in the party's SPU runtime. A client therefore sends the
chunks' contents joined (in `messages.SharePart` parts, which the party joins again), a party checks that content's
exact size against the declared shape, and only the party cuts it into chunks again (`chunks_of`), in the one form it
trusts; results travel back the same way.

For the parties' consistency check (`component_digests`): under ABY3 a party holds, per element, two of the three
additive components of a value, (a_i, a_{i+1}) for party i, stored side by side.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

import numpy as np
import spu.libspu as libspu

#: the size of the chunks a party cuts a share's content into for its SPU runtime
CHUNK_BYTES = 1 << 22


def content_of(chunks: Sequence[bytes]) -> bytes:
    """A share's content from its serialised ValueChunks, which must cover it in order, each once."""
    parts, total = [], None
    for raw in chunks:
        chunk = libspu.ValueChunk()
        chunk.ParseFromString(raw)
        offset = sum(len(p) for p in parts)
        if chunk.chunk_offset != offset or (total is not None and chunk.total_bytes != total):
            raise ValueError(f"share chunks out of order: offset {chunk.chunk_offset} where {offset} was due")
        total = chunk.total_bytes
        parts.append(chunk.content)
    content = b"".join(parts)
    if total is not None and len(content) != total:
        raise ValueError(f"share chunks hold {len(content)} bytes of the {total} they announce")
    return content


def chunks_of(content) -> List[bytes]:
    """Serialised ValueChunks of ``content`` (bytes, or a view of them), in order, each at most CHUNK_BYTES."""
    chunks = []
    for offset in range(0, max(len(content), 1), CHUNK_BYTES):
        chunk = libspu.ValueChunk()
        chunk.total_bytes, chunk.chunk_offset = len(content), offset
        chunk.content = bytes(content[offset:offset + CHUNK_BYTES])
        chunks.append(chunk.SerializeToString())
    return chunks


def component_digests(meta: bytes, content, elements: int) -> Tuple[str, str]:
    """SHA-256 of the share's (public) meta with the first, and with the second, component a party holds of each
    element (a_i and a_{i+1} for party i): party i's second must be party i+1's first, and only party i+1, which holds
    it, may see its digest. The meta makes the parties agree on the value's type too."""
    pairs = np.frombuffer(content, np.uint8).reshape(elements, 2, -1) if elements else np.zeros((0, 2, 0), np.uint8)
    return tuple(hashlib.sha256(meta + np.ascontiguousarray(pairs[:, k]).tobytes()).hexdigest() for k in (0, 1))
