"""Frames read on demand, so that training never copies the whole image.

A training image is a set of 2D frames: the leading axes (S, T, Z) flattened, one channel at a
time. :class:`Frame` is one of them (or a band of its rows), read as float32 only where a patch,
a validation patch or a statistic needs it. The source can be a numpy array (a memory-mapped
one included), a dask or zarr array, or a TIFF on disk (:class:`TiffPages`, which reads rows of
pages with ``pread`` and never maps or loads the file), so a 2 GB time-lapse trains in far less
memory than its size: the patches of a step, the validation patches and one frame at a time for
the statistics.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from .errors import InputError

#: larger magnitudes overflow float32 when squared in the likelihood (3.4e38)
MAX_ABS_VALUE = 1e18


def _as_numpy(block) -> np.ndarray:
    if hasattr(block, "compute"):  # dask
        block = block.compute()
    return np.asarray(block)


def is_lazy(image) -> bool:
    """True for array-likes that are not numpy arrays (dask, zarr, :class:`TiffPages`...)."""
    return (not isinstance(image, (np.ndarray, list, tuple)) and hasattr(image, "shape")
            and hasattr(image, "dtype") and hasattr(image, "__getitem__"))


class Frame:
    """One 2D frame of ``source`` (a band of its rows ``rows``), read on demand as float32.

    ``key`` is the index of the frame in ``source``: integers for the leading (and channel) axes,
    ``None`` where the Y and X axes are.
    """

    __slots__ = ("source", "key", "rows", "width", "_yx")

    def __init__(self, source, key: tuple, rows: tuple[int, int], width: int) -> None:
        self.source, self.key, self.rows, self.width = source, tuple(key), rows, int(width)
        self._yx = [i for i, k in enumerate(self.key) if k is None]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.width)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    ndim = 2

    def band(self, a: int, b: int) -> Frame:
        """Rows ``a:b`` of this frame (relative to its first row)."""
        h = self.shape[0]
        a, b = max(0, min(h, a)), max(0, min(h, b))
        return Frame(self.source, self.key, (self.rows[0] + a, self.rows[0] + max(a, b)), self.width)

    def read(self, ys: slice = slice(None), xs: slice = slice(None), raw: bool = False) -> np.ndarray:
        """Pixels ``ys, xs`` as float32 (``raw``: in the source's dtype)."""
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.width)
        key = list(self.key)
        key[self._yx[0]] = slice(self.rows[0] + y0, self.rows[0] + max(y0, y1))
        key[self._yx[1]] = slice(x0, max(x0, x1))
        a = _as_numpy(self.source[tuple(key)])
        return a if raw else a.astype(np.float32, copy=False)

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("a Frame takes row bands with step 1")
            return self.band(a, b)
        ys, xs = key
        return self.read(ys, xs)

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"Frame({type(self.source).__name__}, key={self.key}, rows={self.rows})"


def _numeric(dtype, name: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in "biuf":
        raise InputError(f"{name} has dtype {dt}; expected a numeric (integer or float) array")
    return dt


def frames_of(image, axes: str, channel: tuple[int, int] | None = None,
              name: str = "image") -> list[Frame]:
    """The 2D frames of ``image`` (any array-like) with checked ``axes`` (no C; see ``channel``).

    ``channel``: ``(position of the C axis in the array, index)`` for one channel of a
    multi-channel array; ``axes`` then describe the other axes.
    """
    shape = tuple(int(v) for v in image.shape)
    _numeric(image.dtype, name)
    if 0 in shape:
        raise InputError(f"{name} is empty (shape {shape})")
    dims = list(range(len(shape)))
    c_pos = None
    if channel is not None:
        c_pos, c_idx = channel
        dims.remove(c_pos)
    h, w = shape[dims[-2]], shape[dims[-1]]
    lead = dims[:-2]
    out = []
    for idx in np.ndindex(*[shape[d] for d in lead]) if lead else [()]:
        key: list = [None] * len(shape)
        for d, i in zip(lead, idx):
            key[d] = int(i)
        if c_pos is not None:
            key[c_pos] = int(c_idx)
        out.append(Frame(image, tuple(key), (0, h), w))
    return out


def frame_statistics(frames: Sequence, name: str = "image") -> tuple[float, float]:
    """Mean and std of every pixel of ``frames`` (float64, one frame read at a time), after
    checking the values: no NaN or infinity, nothing float32 arithmetic cannot square."""
    n_tot, mean_tot, m2_tot = 0, 0.0, 0.0
    for f in frames:
        a = f.read(raw=True) if isinstance(f, Frame) else np.asarray(f)
        if a.dtype.kind == "f":
            finite = np.isfinite(a)
            if not finite.all():
                bad = int((~finite).sum())
                raise InputError(f"NaN or infinite pixel values in {name} ({bad} in one frame): "
                                 "replace them (e.g. with the median) first")
        small_int = a.dtype.kind in "biu" and a.dtype.itemsize <= 4  # cannot reach the limit
        big = 0.0 if small_int else float(np.abs(a.astype(np.float64)).max())
        if big > MAX_ABS_VALUE:
            raise InputError(
                f"{name} has values up to {big:.3g}, beyond what float32 arithmetic can square "
                f"(at most {MAX_ABS_VALUE:.0e}); rescale the data first (e.g. divide it by "
                f"{10.0 ** round(math.log10(big) - 4):.0e})")
        a64 = a.astype(np.float64).ravel()
        n = a64.size
        m = float(a64.mean())
        m2 = float(((a64 - m) ** 2).sum())
        tot = n_tot + n  # Chan et al.: merge the frame's mean and squared deviations
        delta = m - mean_tot
        mean_tot += delta * n / tot
        m2_tot += m2 + delta * delta * n_tot * n / tot
        n_tot = tot
    return mean_tot, math.sqrt(m2_tot / max(n_tot, 1))


def sample_pixels(frames: Sequence, n: int = 100_000) -> np.ndarray:
    """About ``n`` pixels spread over ``frames`` (whole frames, evenly spaced; float32)."""
    total = sum(f.shape[0] * f.shape[1] for f in frames)
    per = max(1, frames[0].shape[0] * frames[0].shape[1])
    want = max(1, min(len(frames), math.ceil(n / per)))
    pick = np.linspace(0, len(frames) - 1, want).round().astype(int)
    vals = [np.asarray(frames[k], dtype=np.float32).ravel() for k in np.unique(pick)]
    out = np.concatenate(vals)
    step = max(1, out.size // n) if total > n else 1
    return out[::step]


class TiffPages:
    """A TIFF series read page by page from disk: the array-like :class:`Frame` reads from.

    Uncompressed series stored contiguously (what tifffile, ImageJ and most acquisition software
    write for raw data) are read row band by row band with ``os.pread``: no memory map, nothing
    kept. Other series (compressed, tiled) decode one page at a time, keeping the last few.
    Indexing takes integers for the leading axes and slices for Y and X (and, for interleaved
    RGB samples, an integer for the sample axis), as :class:`Frame` uses it.
    """

    CACHE_PAGES = 4

    def __init__(self, path: str | os.PathLike, series: int = 0) -> None:
        import tifffile

        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()
        self._tif = tifffile.TiffFile(self.path)
        try:
            s = self._tif.series[series]
            self.series = series
            self.shape = tuple(int(v) for v in s.shape)
            self.axes = s.axes.upper()
            self.dtype = np.dtype(s.dtype)
            page = s.keyframe
            self.page_shape = tuple(int(v) for v in page.shape)  # (Y, X) or (Y, X, S)
            self._file_dtype = np.dtype(self._tif.byteorder + self.dtype.str[1:])
            self._n_pages = int(np.prod(self.shape)) // int(np.prod(self.page_shape))
            self._offset = s.dataoffset if page.compression == 1 and not page.is_tiled else None
            self._fd = os.open(self.path, os.O_RDONLY) if self._offset is not None else None
        except Exception:
            self._tif.close()
            raise
        self.ndim = len(self.shape)
        self.contiguous = self._offset is not None
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def close(self) -> None:
        self._tif.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def _split(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        lead_n = self.ndim - len(self.page_shape)
        lead, rest = key[:lead_n], key[lead_n:]
        if len(lead) != lead_n or not all(isinstance(i, (int, np.integer)) for i in lead):
            raise IndexError("TiffPages takes integers for the leading axes")
        page = int(np.ravel_multi_index(tuple(int(i) for i in lead), self.shape[:lead_n])) \
            if lead_n else 0
        ys, xs = rest[0], rest[1]
        sample = rest[2] if len(rest) > 2 else slice(None)
        return page, ys, xs, sample

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        lead_n = self.ndim - len(self.page_shape)
        if any(isinstance(k, slice) for k in key[:lead_n]) or len(key) < self.ndim:
            return self._block(key, lead_n)  # slices of the leading axes too (e.g. from dask)
        page, ys, xs, sample = self._split(key)
        h, w = self.page_shape[0], self.page_shape[1]
        y0, y1, _ = ys.indices(h) if isinstance(ys, slice) else (int(ys), int(ys) + 1, 1)
        if self._fd is not None:
            row = w * int(np.prod(self.page_shape[2:])) * self.dtype.itemsize
            start = self._offset + page * h * row + y0 * row
            n = max(0, y1 - y0) * row
            buf = os.pread(self._fd, n, start)
            if len(buf) != n:
                raise InputError(f"{self.path} is shorter than its header says (truncated?)")
            a = np.frombuffer(buf, self._file_dtype).reshape(max(0, y1 - y0), w,
                                                              *self.page_shape[2:])
            a = a[:, xs] if isinstance(ys, slice) else a[0, xs]
        else:
            a = self._page(page)
            a = a[ys, xs]
        if len(self.page_shape) > 2:
            a = a[..., sample]
        return a.astype(self.dtype, copy=False)

    def _block(self, key: tuple, lead_n: int) -> np.ndarray:
        """Any box of the array (slices or integers per axis), page by page."""
        key = key + (slice(None),) * (self.ndim - len(key))
        lead = [range(*k.indices(n)) if isinstance(k, slice) else [int(k)]
                for k, n in zip(key[:lead_n], self.shape[:lead_n])]
        rest = key[lead_n:]
        sizes = [len(r) for r in lead]
        page_key = tuple(rest)
        one = self[(*[r[0] if len(r) else 0 for r in lead], *page_key)]
        out = np.empty((*sizes, *one.shape), one.dtype)
        for pos in np.ndindex(*sizes):
            out[pos] = self[(*[r[i] for r, i in zip(lead, pos)], *page_key)]
        # integer keys drop their axes
        shape = [n for n, k in zip(sizes, key[:lead_n]) if isinstance(k, slice)]
        return out.reshape(*shape, *one.shape)

    def _page(self, k: int) -> np.ndarray:
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return self._cache[k]
            s = self._tif.series[self.series]
            a = s.pages[k].asarray() if s.pages[k] is not None else s.asarray(key=k)
            self._cache[k] = a
            while len(self._cache) > self.CACHE_PAGES:
                self._cache.popitem(last=False)
            return a

    def __repr__(self) -> str:
        return f"TiffPages({self.path!r}, shape={self.shape}, axes={self.axes})"
