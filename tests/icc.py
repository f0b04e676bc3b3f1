"""A minimal ICC v2 RGB matrix/TRC display profile, built byte by byte for tests (ICC.1:2001-04)."""

from __future__ import annotations

import struct

def s15(v): return struct.pack(">i", round(v * 65536))

def xyz(x, y, z): return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

def curv(gamma): return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"

def desc(text):
    a = text.encode() + b"\0"
    body = b"desc" + b"\0" * 4 + struct.pack(">I", len(a)) + a + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67
    return body + b"\0" * (-len(body) % 4)

def rgb_profile(name, red, green, blue, gamma):
    tags = [(b"desc", desc(name)), (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)),
            (b"bXYZ", xyz(*blue)), (b"rTRC", curv(gamma)), (b"gTRC", curv(gamma)), (b"bTRC", curv(gamma)),
            (b"cprt", b"text" + b"\0" * 4 + b"none\0\0\0\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + b"RGB " + b"XYZ "
    header += b"\0" * 12 + b"acsp" + b"\0" * 4 + b"\0" * 4 + b"\0" * 8 + b"\0" * 8 + struct.pack(">I", 0)
    header += s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


# Adobe RGB (1998) primaries adapted to D50, gamma 2.2: a wider gamut than sRGB.
ADOBE_RGB = rgb_profile(
    "Adobe RGB (1998) test profile", (0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446), 2.2
)
