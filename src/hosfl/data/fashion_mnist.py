"""Fashion-MNIST from its original IDX files (Xiao et al. 2017, MIT licence).

Where the files are looked for, in order:
1. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
2. the user's cache ``~/.cache/hosfl/fashion-mnist``, also where downloads go;
3. a download of the original files into the cache, when the internet is there.
Otherwise ``DataError`` says how to get them. Setting ``HOSFL_DATA=DIR`` replaces 1 and 2 by
``DIR/fashion-mnist`` alone (and downloads go there).
"""

from __future__ import annotations

import gzip
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Pixel statistics of the training set, used to standardise inputs.
MEAN, STD = 0.2860, 0.3530


class DataError(RuntimeError):
    """A dataset that cannot be found, fetched or read."""


def cache_dir() -> Path:
    root = os.environ.get("HOSFL_DATA")
    return (Path(root) if root else Path.home() / ".cache" / "hosfl") / "fashion-mnist"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip file ({e})") from None
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: {body.size} values, header says {dims}")
    return body.reshape(dims)


def _download(folder: Path, url: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES["train"] + FILES["test"]:
        target = folder / name
        if target.exists():
            continue
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(url + name, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
        tmp.replace(target)


def locate(mirror: str | None = None) -> Path:
    """The folder that holds the four IDX files, downloading them if needed and possible."""
    candidates = [cache_dir()] if os.environ.get("HOSFL_DATA") else [DEBIAN_DIR, cache_dir()]
    for folder in candidates:
        if all((folder / n).exists() for n in FILES["train"] + FILES["test"]):
            return folder
    url = mirror or os.environ.get("HOSFL_FMNIST_MIRROR", MIRROR)
    try:
        _download(cache_dir(), url)
        return cache_dir()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataError(
            f"Fashion-MNIST not found in {' or '.join(map(str, candidates))} and the download "
            f"from {url} failed ({e}). Install it with 'apt-get install dataset-fashion-mnist' "
            f"or put the four *-ubyte.gz files in {cache_dir()}."
        ) from None


def load(
    split: str, limit: int = 0, mirror: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as standardised float32 (N, 1, 28, 28) and labels as int64 (N,)."""
    folder = locate(mirror)
    image_file, label_file = FILES[split]
    images = _read_idx(folder / image_file, 0x00000803)
    labels = _read_idx(folder / label_file, 0x00000801)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
