"""Molmo's pointing answers: `<point x=".." y=".." alt="..">` tags -> pixel coordinates, and drawing."""
from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_TAG = re.compile(r"<(points?)\b([^>]*)>(.*?)</\1>", re.S)
_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


@dataclass(frozen=True)
class Point:
    x: float  # pixels from the left of the original image
    y: float  # pixels from the top
    label: str


def parse_points(text: str, width: int, height: int) -> list[Point]:
    """Every point in an answer, in order, converted from percent of the image to pixels.

    Handles `<point x y alt>` and `<points x1 y1 x2 y2 ... alt>`; malformed tags are skipped.
    """
    points = []
    for _, attrs, body in _TAG.findall(text):
        a = dict(_ATTR.findall(attrs))
        label = a.get("alt") or body.strip()
        pairs = [("x", "y")] if "x" in a else [(f"x{i}", f"y{i}") for i in range(1, 1000) if f"x{i}" in a]
        for kx, ky in pairs:
            try:
                x, y = float(a[kx]), float(a[ky])
            except (KeyError, ValueError):
                continue
            if 0 <= x <= 100 and 0 <= y <= 100:
                points.append(Point(x / 100 * width, y / 100 * height, label))
    return points


def draw_points(image: Image.Image, points: list[Point]) -> Image.Image:
    """A copy of the image with a numbered marker on each point."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    r = max(6, round(min(out.size) / 60))
    font = ImageFont.load_default()
    for i, p in enumerate(points, 1):
        draw.ellipse([p.x - r, p.y - r, p.x + r, p.y + r], fill=(255, 40, 40), outline=(255, 255, 255), width=2)
        draw.text((p.x, p.y), str(i), fill=(255, 255, 255), font=font, anchor="mm")
    return out
