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
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..errors import HDNWarning, InputError
from ..options import MAX_VALUE as MAX_ABS_VALUE  # larger magnitudes overflow float32 squared

#: a larger share of the sampled pixels at the image's top value is called saturated (clipped)
CLIPPED_SHARE = 0.01


class SaturationWarning(HDNWarning):
    """Many pixels of an image sit at one top value: the detector saturated (or the data were
    clipped), and the noise model, which says how values scatter around the signal, does not hold
    for them."""


def plain_array(image, name: str = "image"):
    """The array an image argument stands for, as the engine reads it; lists and tuples are left
    to the caller (see :func:`~.data.image_array`).

    - a torch tensor: its values, detached from any autograd graph and copied to the CPU from
      whatever device holds it (bfloat16 as float32, which numpy can hold);
    - a NumPy masked array: refused when any pixel is masked (the engine has no use for a mask,
      and would read the values under it as data); one without masked pixels is its data;
    - numpy and lazy arrays (memory-mapped, dask, zarr, :class:`TiffPages`): as they are;
    - a path or None: refused with what to give instead.
    """
    if image is None:
        raise InputError(f"{name} is None: give the image as an array")
    if isinstance(image, (str, bytes, os.PathLike)):
        raise InputError(f"{name} is a path ({os.fsdecode(image)!r}), not an array: read the file "
                         "first (e.g. tifffile.imread(path)), or use the command line "
                         "(napari-hdn train / predict take TIFF files)")
    if isinstance(image, np.ma.MaskedArray):
        mask = np.ma.getmaskarray(image)
        if mask.any():
            n = int(mask.sum())
            raise InputError(
                f"{name} is a masked array with {n} masked pixel(s) of {mask.size} ({n / mask.size:.1%})"
                ": napari-hdn has no use for a mask and would read the values under it as data; "
                "crop the image to its unmasked part, or fill the masked pixels "
                "(image.filled(value)) if treating them as data is acceptable")
        return np.ma.getdata(image)
    if type(image).__module__.startswith("torch"):
        import torch

        if isinstance(image, torch.Tensor):
            t = image.detach()
            try:
                if t.is_sparse:
                    t = t.to_dense()
                t = t.to("cpu")
                if t.dtype == torch.bfloat16:
                    t = t.float()
                return t.resolve_conj().resolve_neg().numpy()
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InputError(f"{name} is a torch tensor on {t.device} whose values cannot be "
                                 f"read ({first}): give a tensor with values, or a numpy array"
                                 ) from None
    return image


def _as_numpy(block) -> np.ndarray:
    if hasattr(block, "compute"):  # dask
        block = block.compute()
    return np.asarray(block)


def is_lazy(image) -> bool:
    """True for array-likes that are not numpy arrays (dask, zarr, :class:`TiffPages`...); a torch
    tensor is not one (:func:`plain_array` turns it into its values)."""
    return (not isinstance(image, (np.ndarray, list, tuple))
            and not type(image).__module__.startswith("torch") and hasattr(image, "shape")
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
    image = plain_array(image, name)  # a tensor's values; a masked array refused
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


def _frames_for_sampling(image) -> Sequence:
    if isinstance(image, (list, tuple)):
        return image
    if isinstance(image, np.ndarray):
        return image.reshape(-1, *image.shape[-2:]) if image.ndim >= 2 else image.reshape(1, -1)
    return frames_of(image, "", name="the image")  # a lazy array: only sampled frames are read


def _dtype_of(frames) -> np.dtype | None:
    first = frames[0]
    src = first.source if isinstance(first, Frame) else first
    return np.dtype(src.dtype) if hasattr(src, "dtype") else None


def check_saturation(image, name: str = "the image", dtype=None, n: int = 100_000) -> str:
    """Warn (:class:`SaturationWarning`) when more than :data:`CLIPPED_SHARE` of ``image``'s
    pixels sit at its top value: at the largest value of its integer dtype (255 of uint8, 65535
    of uint16), or at a value that holds more pixels than the value below it, a spike a clipped
    histogram has and a natural tail never does (a 12-bit camera's 4095 in a uint16 file, data
    clipped before they were saved). Returns the message ("" when none).

    ``image``: an array (any number of axes, lazy ones included) or a sequence of 2D frames
    (:class:`Frame` s); about ``n`` pixels of whole frames are read (:func:`sample_pixels`), so
    the check costs one or a few frames. ``dtype``: the data's own dtype, where ``image`` was
    converted (to float32) before. The low end is not checked: dark frames of photon-counting
    data peak at zero without being clipped.
    """
    if 0 in tuple(getattr(image, "shape", (1,))):
        return ""  # no pixels: the caller's own checks say so
    frames = _frames_for_sampling(image)
    if len(frames) == 0:
        return ""
    dt = np.dtype(dtype) if dtype is not None else _dtype_of(frames)
    with np.errstate(over="ignore", invalid="ignore"):  # huge values: refused with the statistics
        v = sample_pixels(frames, n)
    if v.size < 2 or not np.isfinite(v).all():
        return ""  # NaN and infinity are refused elsewhere, with their own message
    top = v.max()
    at_top = int(np.count_nonzero(v == top))
    share = at_top / v.size
    if share <= CLIPPED_SHARE:
        return ""
    dtype_max = dt is not None and dt.kind in "ui" and top == np.float32(np.iinfo(dt).max)
    if not dtype_max:
        below = v[v < top]
        if below.size == 0:
            return ""  # a constant image: training and prediction say so themselves
        if at_top <= int(np.count_nonzero(below == below.max())):
            return ""  # the top of a histogram that falls off: no clipping
    where = (f"{top:g}, the largest value of the dtype {dt}" if dtype_max else
             f"{top:g}, the largest value (a spike at the top of the histogram)")
    msg = (f"{name}: {share:.1%} of the pixels are at {where}: they look saturated (clipped), and "
           "clipped pixels break the noise model (their noise is cut off), so the result there is "
           "wrong; acquire with less exposure or gain, or crop the saturated regions away")
    warnings.warn(msg, SaturationWarning, stacklevel=3)
    return msg


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

        from ..files.safeio import check_input_file

        check_input_file(path, "TIFF", "TIFF file", InputError)  # never a FIFO opened
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
