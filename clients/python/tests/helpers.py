"""Inputs the tests make themselves: PNG images (no imaging library needed) and a text corpus
with its word count computed here, the way `wordcount.map` tokenises ASCII text."""

from __future__ import annotations

import collections
import re
import struct
import zlib


def png(width: int, height: int) -> bytes:
    """An RGB PNG with a gradient, so that blurring it is real work."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        rows.extend(
            bytes(
                ((x * 7 + y) % 256, (y * 3) % 256, (x ^ y) % 256)[i % 3]
                for x in range(width)
                for i in range(3)
            )
        )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )


WORDS = "the cat sat on a mat while spine agents count every word in these fragments".split()


def corpus(fragments: int) -> list:
    """`fragments` ASCII texts of a few hundred words each, different from one another."""
    out = []
    for f in range(fragments):
        words = [WORDS[(f * 7 + i * i) % len(WORDS)] for i in range(200 + f * 13)]
        out.append((" ".join(words) + f"\nfragment {f} ends here.\n").encode())
    return out


def word_count(texts: list) -> dict:
    counts: collections.Counter = collections.Counter()
    for t in texts:
        counts.update(w.lower() for w in re.findall(r"[A-Za-z0-9]+", t.decode()))
    return dict(counts)
