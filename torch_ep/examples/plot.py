"""A loss curve as a PNG, with the standard library only (zlib + struct): no plotting dependency."""
import struct
import zlib
from typing import Sequence

_WHITE, _GREY, _BLUE = (255, 255, 255), (160, 160, 160), (31, 90, 180)


def write_curve_png(path: str, values: Sequence[float], width: int = 640, height: int = 360, margin: int = 24) -> None:
    """Plot `values` against their index: a line inside grey axes; the y range spans min..max of the values."""
    if len(values) == 0:
        raise ValueError("write_curve_png: values is empty")
    pixels = [[_WHITE] * width for _ in range(height)]
    left, right, top, bottom = margin, width - margin, margin, height - margin
    for x in range(left, right + 1):
        pixels[bottom][x] = _GREY
    for y in range(top, bottom + 1):
        pixels[y][left] = _GREY
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    steps = max(len(values) - 1, 1)
    points = [(left + round(i * (right - left) / steps), bottom - round((v - lo) * (bottom - top) / span))
              for i, v in enumerate(values)]
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
        for x, y in _segment(x0, y0, x1, y1):
            for dy in (0, 1):  # two pixels thick
                pixels[min(y + dy, height - 1)][x] = _BLUE
    with open(path, "wb") as f:
        f.write(_png(pixels))


def _segment(x0: int, y0: int, x1: int, y1: int):
    """Integer points of the line from (x0, y0) to (x1, y1)."""
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    return [(x0 + round((x1 - x0) * i / n), y0 + round((y1 - y0) * i / n)) for i in range(n + 1)]


def _png(pixels) -> bytes:
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
