"""Data sets for the quality signals: the built-in ``digits`` and ``shapes32`` and user
data named in the worker's own configuration.

Nothing is downloaded. A client names a data set (``QualitySettings.data``); only the
worker's own configuration maps that name to a path (``data_sources``, read by
:func:`service.worker.config.load_data_sources` from ``--data-sources FILE``,
``FITNAS_DATA_SOURCES_FILE`` or ``FITNAS_DATA_SOURCES``; see docs/quality.md), so a
client can never make a worker read a file of its choosing. ``digits`` is built in:
scikit-learn's bundled 8x8 hand-written digits (1,797 images, 10 classes), resized with
bilinear interpolation to the requested resolution. ``shapes32`` is generated here
(:mod:`search.evaluators.shapes`, seeded, about two seconds): 5,000 RGB images of
32x32, ten shape classes on cluttered backgrounds, on which short-training accuracy
differs between architectures by twice as much as between training seeds and is far
from saturated (docs/quality.md, "shapes32").

A path is either an ImageFolder directory (one sub-directory per class, images inside,
read with Pillow) or an ``.npz`` file with arrays ``x`` (``N,H,W``, ``N,H,W,C`` or
``N,C,H,W``) and ``y`` (``N`` integer labels), and optionally ``x_val``/``y_val`` as a
fixed validation split.

Every data set comes out as float32 ``N,C,H,W`` tensors at the requested resolution,
standardized per channel with the training split's mean and standard deviation, labels
mapped to ``0..K-1`` in sorted order, and a stratified train/validation split drawn with
a fixed seed (the split is a property of the data, the same for every trial).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: configuration stays light
    import torch

BUILTIN = ("digits", "shapes32")
ENV_SOURCES = "FITNAS_DATA_SOURCES"
ENV_SOURCES_FILE = "FITNAS_DATA_SOURCES_FILE"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
# Loaded images are capped so that one data set cannot exhaust a worker's memory: at most
# this many bytes of float32 pixels (a seeded random subsample beyond that).
MAX_DATA_BYTES = 1 << 30
MAX_IN_CHANNELS = 64


class DataError(ValueError):
    """A data set that cannot be used; the message is one line meant for a person."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor  # float32, N,C,H,W, standardized
    y_train: torch.Tensor  # int64, N
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    source: str  # "built-in" or the configured path
    notes: tuple[str, ...] = field(default=())

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.x_train.shape[-1])

    def describe(self) -> dict:
        return {
            "data": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "resolution": self.resolution,
            "n_train": int(self.x_train.shape[0]),
            "n_val": int(self.x_val.shape[0]),
        }


# ---- configuration -------------------------------------------------------------------------


def resolve_source(name: str, data_sources: dict[str, str] | None) -> str | None:
    """The configured path for ``name``; ``None`` for a built-in. Raises :class:`DataError`
    naming the known data sets for anything else."""
    if name in BUILTIN:
        return None
    sources = data_sources or {}
    if name not in sources:
        known = ", ".join([*BUILTIN, *sorted(sources)])
        raise DataError(
            f"unknown data set {name!r}; known here: {known} (name more with --data-sources "
            f"FILE, {ENV_SOURCES_FILE} or {ENV_SOURCES})"
        )
    return sources[name]


# ---- loaders (raw arrays: x float32 N,C,H,W in [0, 1]-ish, y int labels) -------------------


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled digits. The bundled CSV is read directly (the same file
    ``sklearn.datasets.load_digits`` reads) because importing scikit-learn costs seconds
    per evaluation process; ``load_digits`` is the fallback."""
    import gzip
    import importlib.util

    found = importlib.util.find_spec("sklearn")
    csv = (Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz"
           if found is not None and found.origin else None)
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError("the built-in 'digits' data set needs scikit-learn "
                            "(pip install 'fitnas[worker]')") from None
        d = load_digits()
        images, target = d.images.astype(np.float32), d.target.astype(np.int64)
    x = (images / 16.0)[:, None, :, :]
    return x, target, [str(c) for c in range(10)]


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise DataError(f"{where}: x must have shape N,H,W or N,H,W,C or N,C,H,W "
                        f"(got {x.shape})")
    last, second = x.shape[3], x.shape[1]
    if last <= 4 < second:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if second <= MAX_IN_CHANNELS and last > 4:
        return x
    raise DataError(f"{where}: cannot tell channels from x's shape {x.shape}; store it as "
                    "N,C,H,W with C <= 64 and H, W > 4, or N,H,W,C with C <= 4")


def _scale(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.integer):
        hi = float(np.max(x)) if x.size else 1.0
        return x.astype(np.float32) / max(hi, 1.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"x has dtype {x.dtype}; expected numbers")
    return x.astype(np.float32)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: y must be one label per sample (got shape {y.shape})")
    return y


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], tuple | None]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)}; expected x and y "
                        f"(found: {', '.join(arrays) or 'none'})")
    x = _scale(_to_nchw(arrays["x"], str(path)))
    y = _labels(arrays["y"], str(path))
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    val = None
    if "x_val" in arrays or "y_val" in arrays:
        if not ("x_val" in arrays and "y_val" in arrays):
            raise DataError(f"{path}: x_val and y_val must come together")
        xv = _scale(_to_nchw(arrays["x_val"], f"{path} (x_val)"))
        yv = _labels(arrays["y_val"], f"{path} (y_val)")
        if len(xv) != len(yv) or xv.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_val/y_val do not match x/y in shape")
        val = (xv, yv)
    return x, y, [], val


def _image_folder(path: Path, resolution: int, max_bytes: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: an ImageFolder directory needs one sub-directory per class")
    files: list[tuple[Path, int]] = []
    for ci, cname in enumerate(classes):
        for f in sorted((path / cname).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((f, ci))
    if not files:
        raise DataError(f"{path}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    # Grayscale-only folders stay single-channel; anything else is read as RGB.
    max_n = max(1, max_bytes // (3 * resolution * resolution * 4))
    if len(files) > max_n:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.permutation(len(files))[:max_n])
        files = [files[i] for i in keep]
    images: list[Image.Image] = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{f}: not a readable image ({exc})") from None
    gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images)
    arrays = []
    for im in images:
        im = im.convert("L" if gray else "RGB").resize((resolution, resolution),
                                                        Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32) / 255.0
        arrays.append(a[None] if gray else a.transpose(2, 0, 1))
    x = np.stack(arrays)
    y = np.array([c for _, c in files], dtype=np.int64)
    return x, y, classes


# ---- assembly -------------------------------------------------------------------------------


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        # at least one of each class in validation, at least one left to train on
        n_val = min(max(round(len(idx) * val_fraction), 1), len(idx) - 1) if len(idx) >= 2 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return (rng.permutation(np.concatenate(train_idx)),
            rng.permutation(np.concatenate(val_idx)))


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    if x.shape[-2:] == (resolution, resolution):
        return x
    out = []
    for chunk in torch.split(x, 1024):  # bounded peak memory
        out.append(F.interpolate(chunk, size=(resolution, resolution), mode="bilinear",
                                 align_corners=False, antialias=chunk.shape[-1] > resolution))
    return torch.cat(out)


def _cap(x: np.ndarray, y: np.ndarray, resolution: int, max_bytes: int, seed: int
         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    per = x.shape[1] * resolution * resolution * 4
    max_n = max(1, max_bytes // per)
    if len(x) <= max_n:
        return x, y, []
    keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:max_n])
    return x[keep], y[keep], [f"subsampled {max_n} of {len(x)} samples (memory cap)"]


@lru_cache(maxsize=4)
def _load_cached(name: str, path: str | None, mtime: float, resolution: int,
                 val_fraction: float, split_seed: int, max_bytes: int) -> Dataset:
    import torch

    del mtime  # part of the cache key only
    notes: list[str] = []
    val: tuple | None = None
    classes: list[str] = []
    if path is None and name == "shapes32":
        from search.evaluators.shapes import CLASSES, generate

        x, y = generate()
        classes, source = list(CLASSES), "built-in (generated)"
    elif path is None:
        x, y, classes = _digits()
        source = "built-in"
    else:
        p = Path(path).expanduser()
        source = str(p)
        if p.is_dir():
            x, y, classes = _image_folder(p, resolution, max_bytes, split_seed)
        elif p.is_file() and p.suffix.lower() == ".npz":
            x, y, _, val = _npz(p)
        elif p.exists():
            raise DataError(f"data set {name!r}: {p} is neither an ImageFolder directory nor "
                            "an .npz file")
        else:
            raise DataError(f"data set {name!r}: {p} does not exist")
    if len(x) == 0:
        raise DataError(f"data set {name!r} has no samples")
    if x.shape[1] > MAX_IN_CHANNELS:
        raise DataError(f"data set {name!r} has {x.shape[1]} channels (at most "
                        f"{MAX_IN_CHANNELS})")
    x, y, capped = _cap(x, y, resolution, max_bytes, split_seed)
    notes += capped
    # Labels -> 0..K-1 over train and validation together.
    all_y = y if val is None else np.concatenate([y, val[1]])
    uniq, inv = np.unique(all_y, return_inverse=True)
    if len(uniq) < 2:
        raise DataError(f"data set {name!r} has {len(uniq)} class; at least 2 are needed")
    if not classes:
        classes = [str(u) for u in uniq]
    y_all = inv.astype(np.int64)
    if val is None:
        tr, va = _stratified_split(y_all, val_fraction, split_seed)
        x_tr, y_tr, x_va, y_va = x[tr], y_all[tr], x[va], y_all[va]
    else:
        x_tr, y_tr = x, y_all[: len(y)]
        x_va, y_va = val[0], y_all[len(y):]
    if len(x_va) == 0:
        raise DataError(f"data set {name!r} is too small for a validation split "
                        f"({len(x)} samples)")
    xt = _resize(torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32)), resolution)
    xv = _resize(torch.from_numpy(np.ascontiguousarray(x_va, dtype=np.float32)), resolution)
    mean = xt.mean(dim=(0, 2, 3), keepdim=True)
    std = xt.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xt = ((xt - mean) / std).contiguous()
    xv = ((xv - mean) / std).contiguous()
    return Dataset(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr)),
        x_val=xv,
        y_val=torch.from_numpy(np.ascontiguousarray(y_va)),
        num_classes=len(uniq),
        classes=tuple(classes),
        source=source,
        notes=tuple(notes),
    )


def load_dataset(
    name: str,
    resolution: int = 32,
    data_sources: dict[str, str] | None = None,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_bytes: int = MAX_DATA_BYTES,
) -> Dataset:
    """Load data set ``name`` at ``resolution`` (square). ``data_sources`` is the worker's
    own name -> path mapping (see :func:`data_sources_from_env`); ``digits`` and
    ``shapes32`` are built in.
    Raises :class:`DataError` with a one-line message on any problem."""
    if not 8 <= resolution <= 1024:
        raise DataError(f"resolution must be in [8, 1024] (got {resolution})")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    path = resolve_source(name, data_sources)
    mtime = 0.0
    if path is not None:
        try:
            mtime = Path(path).expanduser().stat().st_mtime
        except OSError:
            mtime = -1.0
    ds = _load_cached(name, path, mtime, resolution, val_fraction, split_seed, max_bytes)
    return ds


def fit_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Repeat a single-channel batch to ``in_channels`` (grayscale -> RGB-like)."""
    if x.shape[1] == in_channels:
        return x
    if x.shape[1] != 1:
        raise DataError(f"cannot map {x.shape[1]} data channels to {in_channels}")
    return x.expand(-1, in_channels, -1, -1).contiguous()
