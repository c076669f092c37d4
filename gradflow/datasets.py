"""Image data sets for the natural-data experiments: scikit-learn's digits and local IDX files.

- [`load_digits`][gradflow.datasets.load_digits]: the 1797 handwritten 8×8 digits that
  ship with scikit-learn (pixels 0..16), split into train and test at random. Needs
  no download.
- [`load_idx`][gradflow.datasets.load_idx]: MNIST or Fashion-MNIST from a folder
  holding the four files in their original IDX format, as distributed by their
  authors (optionally gzipped)::

      train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
      t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

  (the names `train-images.idx3-ubyte` etc., with a dot, are accepted too). gradflow
  does not download them; point `load_idx` at your own copy.
- [`read_idx`][gradflow.datasets.read_idx] / [`write_idx`][gradflow.datasets.write_idx]:
  the IDX format itself, and [`binarize`][gradflow.datasets.binarize] (black and white
  images, as in the tensor-factorization paper's Sec. 5.2).
"""

import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np

# IDX type codes -> big-endian NumPy dtypes (http://yann.lecun.com/exdb/mnist/, "IDX file format")
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: code
              for code, dt in _IDX_DTYPES.items()}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Labelled images split into train and test.

    **Fields:** `name`; `train_images`, `test_images` (arrays `(m, H, W)` of pixel
    values in `[0, max_value]`); `train_labels`, `test_labels` (int arrays `(m,)`);
    `max_value` (the largest possible pixel value: 16 for digits, 255 for MNIST).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    max_value: float

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: {split} images must be (m, H, W) and labels (m,), got "
                    f"{x.shape} and {y.shape}."
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape.")

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def classes(self) -> np.ndarray:
        return np.unique(np.concatenate([self.train_labels, self.test_labels]))

    def subset(self, max_train: int | None = None, max_test: int | None = None,
               seed: int = 0) -> "ImageDataset":
        """At most `max_train` / `max_test` examples of each split, drawn at random."""
        rng = np.random.default_rng(seed)

        def take(x, y, k):
            if k is None or k >= len(y):
                return x, y
            if k < 1:
                raise ValueError(f"subset sizes must be >= 1, got {k}.")
            keep = np.sort(rng.choice(len(y), k, replace=False))
            return x[keep], y[keep]

        tr = take(self.train_images, self.train_labels, max_train)
        te = take(self.test_images, self.test_labels, max_test)
        return dataclasses.replace(self, train_images=tr[0], train_labels=tr[1],
                                   test_images=te[0], test_labels=te[1])


def binarize(images: np.ndarray, max_value: float) -> np.ndarray:
    """Black and white pixels: 1 where `pixel / max_value > 1/2`, else 0 (uint8).

    This is the official code's `round(pixel / max_value)` (ties to even, so exactly
    one half maps to 0).
    """
    images = np.asarray(images)
    if not max_value > 0:
        raise ValueError(f"`max_value` must be > 0, got {max_value!r}.")
    return (images / max_value > 0.5).astype(np.uint8)


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> ImageDataset:
    """scikit-learn's 8×8 handwritten digits (1797 images, pixels 0..16), split at random.

    **Arguments:**

    - `test_fraction`: fraction of the images held out as the test set, in (0, 1).
    - `seed`: seed of the split.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("`load_digits` needs scikit-learn (`pip install scikit-learn`).") from e
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    digits = _sk_load_digits()  # a Bunch (a tuple only with return_X_y=True)
    images = digits.images  # pyright: ignore[reportAttributeAccessIssue]
    labels = digits.target.astype(np.int64)  # pyright: ignore[reportAttributeAccessIssue]
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return ImageDataset("digits", images[train], labels[train], images[test], labels[test],
                        max_value=16.0)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a NumPy array of native byte order.

    Raises `FileNotFoundError` if `path` does not exist and `ValueError` if it is not a
    well-formed IDX file (bad magic number, unknown type code, wrong length).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e}).") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (the magic number must start with two zero bytes, "
            f"got {raw[:4].hex() or 'an empty file'})."
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x} "
                         f"(known: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}).")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: the header declares shape {shape} of {dtype.name} "
            f"({expected} bytes of data) but the file holds {len(raw) - header}."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path, array, compress: bool | None = None) -> Path:
    """Write `array` as an IDX file; gzip it if `compress` (default: name ends in `.gz`).

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    path = Path(path)
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                         f"{sorted({d.name for d in _IDX_DTYPES.values()})}.")
    if array.ndim > 255 or any(s >= 2**32 for s in array.shape):
        raise ValueError(f"IDX cannot store an array of shape {array.shape}.")
    header = bytes([0, 0, _IDX_CODES[big], array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + np.ascontiguousarray(array, dtype=big).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _find_idx(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")
    candidates = [directory / (n + s) for n in (stem, dotted) for s in ("", ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no {stem} file in {directory}; looked for "
        f"{', '.join(c.name for c in candidates)}. Put the four MNIST/Fashion-MNIST IDX "
        "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzipped or not) in that folder."
    )


def load_idx(directory, name: str | None = None) -> ImageDataset:
    """MNIST or Fashion-MNIST (or any set in the same layout) from its four IDX files.

    **Arguments:**

    - `directory`: folder holding the files listed in this module's docstring.
    - `name`: a label for the data set (default: the folder's name).

    **Returns:** an [`ImageDataset`][gradflow.datasets.ImageDataset] with the
    original train/test split and `max_value` 255.
    """
    directory = Path(os.path.expanduser(str(directory)))
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX folder not found: {directory}")
    arrays = {key: read_idx(_find_idx(directory, stem)) for key, stem in IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3:
            raise ValueError(f"{split} images in {directory} must be 3-d (m, H, W), got shape {x.shape}.")
        if y.ndim != 1:
            raise ValueError(f"{split} labels in {directory} must be 1-d, got shape {y.shape}.")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{directory}: {x.shape[0]} {split} images but {y.shape[0]} {split} labels."
            )
    return ImageDataset(
        name or directory.name,
        arrays["train_images"], arrays["train_labels"].astype(np.int64),
        arrays["test_images"], arrays["test_labels"].astype(np.int64),
        max_value=255.0,
    )
