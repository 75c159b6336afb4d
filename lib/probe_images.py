"""Offline OCR-style probe images for the visual-head rule: words rendered with PIL at known boxes.

Each image is square, white, with ``words_per_image`` distinct words in black, one per horizontal band, at a random
horizontal offset, so boxes never overlap.  A box is the rendered text's bounding box in pixels,
``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# distinct, mostly single-token-ish English words (no word is a substring of another)
WORDS = (
    "apple river garden silver planet window orange castle forest yellow rocket bridge market violet "
    "camera island dragon pencil winter summer button helmet jacket ladder mirror museum needle parrot "
    "pillow rabbit saddle tunnel valley wallet zipper anchor basket candle donkey engine falcon guitar "
    "hammer igloo jungle kettle lemon magnet napkin oyster puzzle quartz robot spider tomato umbrella "
    "velvet walrus"
).split()


@dataclass
class Chunk:
    text: str
    box: tuple[int, int, int, int]


@dataclass
class ProbeImage:
    image: Image.Image
    chunks: list[Chunk]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def generate_probe_images(
    n: int, size: int = 336, words_per_image: int = 4, seed: int = 0, words: tuple[str, ...] = WORDS
) -> list[ProbeImage]:
    """``n`` probe images of ``size`` x ``size`` pixels, deterministic for a seed."""
    if words_per_image < 1 or words_per_image > len(words):
        raise ValueError(f"words_per_image must be in [1, {len(words)}]")
    rng = random.Random(seed)
    band = size // words_per_image
    font = _font(max(8, int(band * 0.6)))
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        chunks = []
        for i, word in enumerate(rng.sample(list(words), words_per_image)):
            x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
            w, h = x1 - x0, y1 - y0
            x = rng.randint(0, max(0, size - w - 1)) - x0
            y = i * band + max(0, (band - h) // 2) - y0
            draw.text((x, y), word, fill="black", font=font)
            bx0, by0, bx1, by1 = draw.textbbox((x, y), word, font=font)
            chunks.append(Chunk(word, (max(0, bx0), max(0, by0), min(size, bx1), min(size, by1))))
        out.append(ProbeImage(img, chunks))
    return out


def box_patches(box: tuple[int, int, int, int], image_size: int, grid: int) -> list[int]:
    """Row-major indices of the ``grid`` x ``grid`` patches of a square image that the box overlaps."""
    cell = image_size / grid
    x0, y0, x1, y1 = box
    c0, c1 = int(x0 // cell), min(grid - 1, int((x1 - 1) // cell))
    r0, r1 = int(y0 // cell), min(grid - 1, int((y1 - 1) // cell))
    return [r * grid + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
