"""Make the small sample images in examples/images (synthetic, so they carry no licence).

    python examples/make_images.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent / "images"


def scene(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([80 + 100 * y / height, 140 + 80 * y / height, 230 - 60 * y / height], -1)
    ground = (y > height * (0.55 + 0.1 * np.sin(x / width * 6 + seed)))[..., None]
    arr = np.where(ground, [70, 120 + seed * 20, 50], sky) + rng.normal(0, 8, (height, width, 3))
    cx, cy, r = width * (0.3 + 0.1 * seed), height * 0.3, min(width, height) * 0.12
    sun = ((x - cx) ** 2 + (y - cy) ** 2 < r**2)[..., None]
    arr = np.where(sun, [250, 220, 90], arr)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def main() -> None:
    HERE.mkdir(exist_ok=True)
    (HERE / "more").mkdir(exist_ok=True)
    scene(320, 240, 0).save(HERE / "meadow.jpg", quality=85)
    scene(240, 320, 1).save(HERE / "meadow.png")  # same stem, another file: its own output
    scene(300, 200, 2).convert("L").save(HERE / "more" / "grey.jpg", quality=85)
    logo = Image.new("RGBA", (128, 128), (255, 0, 0, 0))  # transparent red: must embed as white
    logo.paste((20, 60, 200, 255), (32, 32, 96, 96))
    logo.save(HERE / "more" / "logo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; displayed rotated 90 degrees clockwise
    scene(320, 240, 3).transpose(Image.Transpose.ROTATE_90).save(HERE / "more" / "phone.jpg", quality=85, exif=exif.tobytes())


if __name__ == "__main__":
    main()
