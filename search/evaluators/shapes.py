"""``shapes32``: a procedurally generated image-classification set on which the choice of
architecture shows in short-training accuracy.

Why it exists: on the built-in 8x8 digits almost any network reaches 0.9 to 0.98 after a
short training, so the ranking of architectures is squeezed against a ceiling and a
quality signal is judged on the last few percent. ``shapes32`` is made so that what a
CNN can see matters and short training is far from solving it:

* ten classes of filled or hollow shapes (disk, ring, square, square frame, triangle,
  plus, five-point star, half-disk, ellipse, two parallel bars) whose difference is in
  their outline: disk vs ring and square vs frame differ only inside, half-disk vs disk
  or ellipse only in the outline's curvature on one side. Deciding needs a receptive
  field as large as the shape (12 to 26 pixels across) and enough channels to combine
  edges of several orientations;
* every shape has a random size and position (:data:`JITTER` pixels around the centre),
  a random flat colour (the hue carries no label), and sits on a smooth random colour
  field that it is brighter than (:data:`POLARITY`: always brighter); orientation is
  fixed (:data:`ROTATE` = 0: random rotation made 120-step training fail on every
  network tried);
* :data:`CLUTTER` random line segments in random colours over each image (clutter that a
  small receptive field confuses with edges), and Gaussian pixel noise (:data:`NOISE`).

Shapes are rendered at twice the resolution and averaged down (anti-aliased edges).
Everything comes from one seeded generator in a fixed order, so the data is a pure
function of ``(n_per_class, seed)``: the same bytes on every machine; generating the
default 5,000 images takes about two seconds on one core. No file is downloaded or shipped.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disk", "ring", "square", "frame", "triangle", "plus", "star", "half_disk",
           "ellipse", "bars")
RESOLUTION = 32
N_PER_CLASS = 500
SEED = 20260
# Difficulty knobs, as recorded in benchmarks/data (changing one changes the data set).
CLUTTER = 2  # line segments per image
NOISE = 0.04  # pixel noise sigma
ROTATE = 0.0  # fraction of a full turn of random rotation
JITTER = 5.0  # largest offset of the shape's centre, pixels
POLARITY = -1.0  # mean colour above which a shape is darker than its field (-1: never)


def _mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-the-shape indicator in the shape's own coordinates (radius 1 ~ its size)."""
    r2 = u * u + v * v
    box = np.maximum(np.abs(u), np.abs(v))
    if kind == 0:
        return r2 < 1.0
    if kind == 1:
        return (r2 > 0.55**2) & (r2 < 1.0)
    if kind == 2:
        return box < 0.8
    if kind == 3:
        return (box > 0.45) & (box < 0.8)
    if kind == 4:
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= (np.cos(a) * u + np.sin(a) * v) < 0.5
        return inside
    if kind == 5:
        au, av = np.abs(u), np.abs(v)
        return ((au < 0.28) & (av < 0.95)) | ((av < 0.28) & (au < 0.95))
    if kind == 6:
        return np.sqrt(r2) < 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u))
    if kind == 7:
        return (r2 < 1.0) & (v > 0.0)
    if kind == 8:
        return u * u + (v / 0.45) ** 2 < 1.0
    if kind == 9:
        return ((np.abs(v - 0.5) < 0.2) | (np.abs(v + 0.5) < 0.2)) & (np.abs(u) < 0.9)
    raise ValueError(f"no shape class {kind}")


def _smooth_field(rng: np.random.Generator, n: int, res: int) -> np.ndarray:
    """Random colour fields: a 4x4 grid of random colours, bilinearly interpolated."""
    low = rng.uniform(0.0, 1.0, (n, 3, 4, 4)).astype(np.float32)
    t = (np.arange(res, dtype=np.float32) + 0.5) / res * 3.0  # grid coordinates 0..3
    i0 = np.clip(np.floor(t).astype(int), 0, 2)
    w = np.zeros((res, 4), dtype=np.float32)  # bilinear weights as a matrix
    w[np.arange(res), i0] = 1.0 - (t - i0)
    w[np.arange(res), i0 + 1] = t - i0
    return w @ low @ w.T


def generate(n_per_class: int = N_PER_CLASS, seed: int = SEED, res: int = RESOLUTION
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: x float32 ``N,3,res,res`` in [0, 1], y int64 labels, classes
    interleaved (image ``i`` has class ``i % 10``)."""
    rng = np.random.default_rng(seed)
    k = len(CLASSES)
    n = k * n_per_class
    y = np.arange(n, dtype=np.int64) % k
    radius = rng.uniform(6.0, 13.0, n) * res / RESOLUTION
    cx = res / 2 + rng.uniform(-1.0, 1.0, n) * JITTER * res / RESOLUTION
    cy = res / 2 + rng.uniform(-1.0, 1.0, n) * JITTER * res / RESOLUTION
    theta = rng.uniform(0.0, 2 * np.pi, n) * ROTATE
    # shape and background differ in brightness by at least 0.3 (never invisible), hue free
    fg = rng.uniform(0.0, 1.0, (n, 3, 1, 1)).astype(np.float32)
    sign = np.where(fg.mean(axis=1, keepdims=True) > POLARITY, -1.0, 1.0).astype(np.float32)
    bg = _smooth_field(rng, n, res) * 0.4 + fg + sign * rng.uniform(
        0.3, 0.5, (n, 1, 1, 1)).astype(np.float32) - 0.2
    ss = 2  # supersampling
    fine = (np.arange(res * ss, dtype=np.float32) + 0.5) / ss
    mask = np.empty((n, res, res), dtype=np.float32)
    for kind in range(k):
        idx = np.flatnonzero(y == kind)
        rad = radius[idx, None, None].astype(np.float32)
        dx = (fine[None, None, :] - cx[idx, None, None].astype(np.float32)) / rad
        dy = (fine[None, :, None] - cy[idx, None, None].astype(np.float32)) / rad
        c = np.cos(theta[idx])[:, None, None].astype(np.float32)
        s = np.sin(theta[idx])[:, None, None].astype(np.float32)
        inside = _mask(kind, c * dx + s * dy, c * dy - s * dx).astype(np.float32)
        mask[idx] = inside.reshape(len(idx), res, ss, res, ss).mean(axis=(2, 4))
    x = bg * (1.0 - mask[:, None]) + fg * mask[:, None]
    px = (np.arange(res, dtype=np.float32) + 0.5)
    for _ in range(CLUTTER):  # clutter: line segments ~1.4 px wide, 6..20 px long
        x0 = rng.uniform(0, res, n).astype(np.float32)[:, None, None]
        y0 = rng.uniform(0, res, n).astype(np.float32)[:, None, None]
        a = rng.uniform(0, np.pi, n)
        ca = np.cos(a).astype(np.float32)[:, None, None]
        sa = np.sin(a).astype(np.float32)[:, None, None]
        length = rng.uniform(6, 20, n).astype(np.float32)[:, None, None] * res / RESOLUTION
        ddx, ddy = px[None, None, :] - x0, px[None, :, None] - y0
        along, across = ddx * ca + ddy * sa, ddy * ca - ddx * sa
        stroke = ((np.abs(across) < 0.7) & (along > 0) & (along < length)).astype(np.float32)
        colour = rng.uniform(0.0, 1.0, (n, 3, 1, 1)).astype(np.float32)
        x = x * (1.0 - stroke[:, None]) + colour * stroke[:, None]
    x += NOISE * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32), y
