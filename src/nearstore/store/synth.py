"""Synthetic ImageNet-like JPEG folders: the project's only data source.

Images are deterministic for ``(seed, index)``, whatever the number of worker
processes. Content is natural-image-like: a colored 1/f^alpha noise field
(the power spectrum of natural scenes) with a few smooth shapes on top, so
JPEG sizes and decode costs behave like photos rather than flat test cards.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from nearstore.core.errors import ConfigError

__all__ = ["SynthSpec", "synth_image", "synth_folder", "class_color"]


@dataclass(frozen=True, kw_only=True)
class SynthSpec:
    """What to generate.

    ``large`` makes 1-4 MP photos (raw samples far bigger than a 224x224 input);
    the default makes ImageNet-like images of 200-1000 px a side, ~110 KB each.
    ``class_colors`` tints each class's background with its own hue, so the
    classes are separable (a labelled dataset for transfer-learning tests);
    otherwise content does not depend on the label.
    """

    n: int
    seed: int = 0
    classes: int = 10
    large: bool = False
    quality: int = 90
    class_colors: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1 (got {self.n})")
        if not 1 <= self.classes <= 100_000:
            raise ConfigError(f"classes must be in 1..100000 (got {self.classes})")
        if not 30 <= self.quality <= 100:
            raise ConfigError(f"quality must be in 30..100 (got {self.quality})")


def _dims(rng: np.random.Generator, large: bool) -> tuple[int, int]:
    if large:
        mpix = rng.uniform(1.0, 4.0) * 1e6
        aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3])
        w = int(round(np.sqrt(mpix * aspect)))
        h = int(round(mpix / w))
        return w, h
    # ImageNet-like: most images near 500x375, a long tail on both sides.
    w = int(np.clip(rng.lognormal(np.log(480), 0.25), 200, 1000))
    aspect = float(np.clip(rng.lognormal(np.log(0.78), 0.18), 0.5, 1.6))
    h = int(np.clip(round(w * aspect), 200, 1000))
    return w, h


def class_color(label: int, classes: int) -> np.ndarray:
    """The background color of class ``label`` of ``classes``: evenly spaced hues, mid saturation and value."""
    hue = 6.0 * (label % classes) / classes
    x = 1 - abs(hue % 2 - 1)
    rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(hue) % 6]
    return 60.0 + 130.0 * np.asarray(rgb, np.float64)


def _pink_field(rng: np.random.Generator, h: int, w: int, alpha: float,
                palette: np.ndarray | None = None) -> np.ndarray:
    """Three correlated channels of 1/f^alpha noise, float32 in [0, 255]."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = (1.0 / f**alpha).astype(np.float32)
    amp[0, 0] = 0.0
    base = rng.standard_normal((h, w // 2 + 1, 2), dtype=np.float32)
    spec_base = (base[..., 0] + 1j * base[..., 1]) * amp
    mix = rng.uniform(0.2, 0.9)
    out = np.empty((h, w, 3), np.float32)
    drawn = rng.uniform(40, 215, size=3)  # drawn either way: the stream (and other images) stay the same
    palette = drawn if palette is None else palette
    for c in range(3):
        own = rng.standard_normal((h, w // 2 + 1, 2), dtype=np.float32)
        spec = spec_base * mix + (own[..., 0] + 1j * own[..., 1]) * amp * (1 - mix)
        field = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
        field /= field.std() + 1e-6
        out[..., c] = palette[c] + field * rng.uniform(30, 55)
    return out


def synth_image(seed: int, index: int, *, large: bool = False, quality: int = 90,
                palette: np.ndarray | None = None) -> bytes:
    """Return the JPEG bytes of image ``index`` for ``seed`` (``palette``: a fixed background color)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x5EED]))
    w, h = _dims(rng, large)
    alpha = rng.uniform(0.85, 1.15)
    arr = _pink_field(rng, h, w, alpha, palette)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = sorted(rng.integers(0, w, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, h, size=2).tolist())
        color = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=color)
        else:
            draw.rectangle((x0, y0, x1 + 1, y1 + 1), outline=color, width=int(rng.integers(1, 6)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_one(args: tuple[Path, int, int, int, bool, int, bool]) -> int:
    out, seed, index, classes, large, quality, colors = args
    label = index % classes
    data = synth_image(seed, index, large=large, quality=quality,
                       palette=class_color(label, classes) if colors else None)
    path = out / f"class_{label:04d}" / f"img_{index:07d}.jpg"
    tmp = path.with_suffix(".jpg.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def synth_folder(
    out: str | os.PathLike,
    spec: SynthSpec,
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write ``spec.n`` JPEGs into ``out/class_XXXX/``; return a summary dict.

    ``progress(k)`` is called after each k images written (for a progress bar).
    """
    out = Path(out)
    for c in range(min(spec.classes, spec.n)):
        (out / f"class_{c:04d}").mkdir(parents=True, exist_ok=True)
    jobs = [(out, spec.seed, i, spec.classes, spec.large, spec.quality, spec.class_colors) for i in range(spec.n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    sizes: list[int] = []
    if workers <= 1:
        for job in jobs:
            sizes.append(_write_one(job))
            if progress:
                progress(1)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for size in pool.map(_write_one, jobs, chunksize=8):
                sizes.append(size)
                if progress:
                    progress(1)
    return {
        "path": str(out),
        "images": spec.n,
        "classes": min(spec.classes, spec.n),
        "bytes": int(sum(sizes)),
        "mean_bytes": float(np.mean(sizes)),
    }
