"""Prediction over data larger than memory: dask arrays in, dask arrays or zarr chunks out.

The image is cut into output chunks: one frame (S/T/Z index) and one ``tile x tile`` block of it.
Each chunk is an independent task that reads its block plus a ``margin`` on every side (the
receptive-field margin), samples it with :class:`~napari_hdn.engine.prediction.sampling.PosteriorSampler`
at its absolute position (``origin``), and keeps the centre. Latent noise is keyed to that
position, so the stitched result equals in-memory prediction up to float rounding wherever the
margin covers the network's receptive field (the default 64 pixels does for the presets).

* :func:`predict_dask` returns lazy dask arrays (nothing is computed until asked).
* :func:`predict_to_zarr` writes MMSE, variance (and samples) chunk by chunk into a zarr store,
  in this process or on a dask.distributed cluster, and resumes a run that was killed: a chunk's
  data are written first (each zarr chunk file is written to a temporary file and renamed, so it
  is never half-written), and only then its cell of the store's ``done`` array is set. A rerun
  skips the chunks marked done and recomputes any other (a chunk whose data were written but not
  marked is simply written again, with the same values: sampling is deterministic).
* :func:`open_array` opens zarr, OME-Zarr and TIFF files lazily as dask arrays.

Workers never receive a pickled model: tasks carry a :class:`ModelRef` (the model file's path)
and each worker process loads the file once (:func:`ModelRef.get` caches it).

Needs ``dask[array]`` and ``zarr`` (and ``distributed`` for clusters): ``pip install
'napari-hdn[cluster]'``. Imported lazily, so the rest of the engine works without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.arrays import as_float_array, check_axes
from ..data.lazy import DEFAULT_TILE, _need, open_array
from ..errors import HDNError, InputError, OptionError, OutputError, StopRequested
from ..events import Callback, EventKind, EventTask, Reporter, StopFlag
from ..options import check_options

#: margin (pixels) read around each output chunk, the default of every entry point
DEFAULT_MARGIN = 64
STORE_KIND = "napari-hdn prediction"
STORE_VERSION = 1


# -- the model, loaded once per process -------------------------------------------------------------

_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


_MALLOC_TUNED = []


def _tune_malloc() -> None:
    """Undo, for torch, what dask.distributed's nanny does to glibc's malloc.

    The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory back to the
    OS). Setting any malloc threshold switches off glibc's dynamic mmap threshold, so every tensor
    above 128 KiB is then mmap'ed and page-faulted afresh: measured 1.6-2.1x slower sampling of
    the tiny benchmark model on one thread. An mmap threshold of 32 MiB (glibc's own dynamic
    ceiling) restores the speed; the trim threshold is left as dask set it. Linux/glibc only, once
    per process, and only where the variable is set (in dask workers).
    """
    if _MALLOC_TUNED or not os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    _MALLOC_TUNED.append(True)
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class ModelRef:
    """What a task needs to get the model: the path of its file (pickled as the path alone).

    ``ModelRef(model)`` for a model in memory works in this process only; a cluster needs a file
    (models are never pickled: a model file runs no code when it is loaded, a pickle would).
    """

    def __init__(self, model, channel: int | None = None):
        from ..network.model import HDNModel

        self.model = None
        self.path = None
        self.channel = channel  # of a file holding a model per channel: the one to use
        if isinstance(model, HDNModel):
            self.model = model
        elif isinstance(model, (str, os.PathLike)):
            p = Path(model).expanduser().resolve()
            if not p.is_file():
                raise InputError(f"model file not found: {model}")
            self.path = str(p)
        else:
            raise InputError(f"model must be an HDNModel or the path of a model file, not "
                             f"{type(model).__name__}")

    def __getstate__(self):
        if self.path is None:
            raise InputError(
                "a dask.distributed cluster loads the model from its file and never receives a "
                "pickled model: save it first (model.save('model.hdn')) and pass the path")
        return {"path": self.path, "model": None, "channel": self.channel}

    def get(self, device=None):
        """The model ready for sampling on ``device`` (eval, channels-last on CPUs); loaded from
        the file at most once per process and device."""
        from .sampling import inference_model

        if self.model is not None:
            key = ("mem", id(self.model), str(device))
        else:
            st = os.stat(self.path)
            key = (self.path, st.st_mtime_ns, st.st_size, str(device), self.channel)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is None:
                _tune_malloc()
                if self.model is not None:
                    model = self.model
                else:
                    from ..network.loading import load_model

                    model = load_model(self.path)
                    if self.channel is not None:
                        model = model.channel(self.channel)
                hit = _CACHE[key] = inference_model(model, device)
            return hit


def model_fingerprint(model) -> str:
    """A short hash of a model's weights, architecture, noise model and normalisation: a resumed
    run must use the same model."""
    tensors, meta = model.file_contents()
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps({k: meta[k] for k in ("config", "noise_model", "normalisation")},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# -- the plan and one chunk -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkSpec:
    """Everything a chunk task needs besides the data and the model (small, picklable)."""

    shape: tuple  # the input's shape (leading axes, Y, X)
    tile: int
    margin: int
    n_samples: int | str  # a count, or "auto" (AutoSamples' default rule, per chunk)
    modes: tuple
    seed: int
    batch_size: int | None
    keep_samples: bool
    device: str | None

    @property
    def kept_samples(self) -> int:
        """Samples kept per pixel with ``keep_samples``: all of a fixed count; the rule's floor
        (the fewest every chunk draws) with "auto"."""
        if isinstance(self.n_samples, str):
            from .sampling import AUTO_SAMPLES, DEFAULT_SAMPLING, _auto_floor

            return _auto_floor(AUTO_SAMPLES, DEFAULT_SAMPLING)
        return self.n_samples

    @property
    def grid(self) -> tuple:
        H, W = self.shape[-2:]
        return (*self.shape[:-2], -(-H // self.tile), -(-W // self.tile))

    def windows(self, idx: tuple):
        """(read slices, own slices within the read block, own slices in the image) of chunk idx."""
        *lead, by, bx = idx
        H, W = self.shape[-2:]
        t, mg = self.tile, self.margin
        ya, yb = by * t, min((by + 1) * t, H)
        xa, xb = bx * t, min((bx + 1) * t, W)
        ry0, ry1 = max(0, ya - mg), min(H, yb + mg)
        rx0, rx1 = max(0, xa - mg), min(W, xb + mg)
        read = (*lead, slice(ry0, ry1), slice(rx0, rx1))
        own_in_block = (slice(ya - ry0, yb - ry0), slice(xa - rx0, xb - rx0))
        own = (*lead, slice(ya, yb), slice(xa, xb))
        return read, own_in_block, own


def compute_chunk(block, model, spec: ChunkSpec, idx: tuple, stop_flag: StopFlag | None = None):
    """Sample one chunk: returns ``(2 [+ n_samples], h, w)`` float32 = MMSE, variance[, samples]
    of the chunk's own region."""
    from .sampling import PosteriorSampler

    read, own, _ = spec.windows(idx)
    arr = as_float_array(np.asarray(block, dtype=np.float32).reshape(
        read[-2].stop - read[-2].start, read[-1].stop - read[-1].start))
    origin = (read[-2].start, read[-1].start)
    sampler = PosteriorSampler(model, arr, origin=origin, device=spec.device)
    mu, var, smp = sampler.sample(spec.n_samples, list(spec.modes), spec.seed, spec.batch_size,
                                  spec.keep_samples, stop_flag=stop_flag)
    parts = [mu[own][None], var[own][None]]
    if smp is not None:
        parts.append(smp[(slice(None), *own)])
    out = np.concatenate(parts).astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise InputError(f"the prediction of chunk {idx} has NaN or infinite values: the model does "
                         "not work on this image (values far outside its training data?)")
    return out


def _chunk_result(block, ref: ModelRef, spec: ChunkSpec, idx: tuple):
    out = compute_chunk(block, ref.get(spec.device), spec, idx)
    return out.reshape(out.shape[0], *([1] * (len(spec.shape) - 2)), *out.shape[-2:])


# -- lazy results ----------------------------------------------------------------------------------


@dataclass
class LazyPrediction:
    """Result of :func:`predict_dask` / :func:`predict_to_zarr`: dask arrays in the input's shape.

    Computing ``mmse`` and ``variance`` separately samples every chunk twice: compute them together
    (``dask.compute(res.mmse, res.variance)``) or write them with :func:`predict_to_zarr`, whose
    arrays are read back from the store.
    """

    mmse: object
    variance: object
    samples: object | None
    levels: list[str]
    n_samples: int
    seed: int
    info: dict = field(default_factory=dict)


def _prepare(model, image, n_samples, axes, levels, seed, batch_size, return_samples, tile_size,
             margin, device, channel):
    from .run import as_model, check_some_level_active, check_training_range
    from .sampling import resolve_samples

    fixed, _ = resolve_samples(n_samples)
    c = check_options(batch_size=batch_size, tile_size=tile_size, margin=margin, seed=seed)
    c["tile_overlap"] = c.pop("margin")
    c["n_samples"] = fixed if fixed is not None else "auto"
    from ..network.multichannel import MultiChannelModel

    ref = ModelRef(model)
    m_obj = ref.model if ref.model is not None else as_model(ref.path)
    if isinstance(m_obj, MultiChannelModel):  # chunk by chunk: one channel, with its own model
        if channel is None:
            raise InputError(
                f"the model holds one HDN per channel ({m_obj.channels}); chunked prediction "
                "restores one channel at a time: give the channel (--channel K on the command "
                f"line, channel=K in Python; 0..{m_obj.channels - 1}), once for each channel")
        m_obj = m_obj.channel(channel)
        ref = ModelRef(ref.path, channel) if ref.path is not None else ModelRef(m_obj)
    m = m_obj.config.downscale
    modes = m_obj.resolve_modes(levels)
    check_some_level_active(modes)
    src = open_array(image, axes, channel)
    x = src.array
    ax = check_axes(src.axes, x.shape)
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise InputError(f"{src.name} has dtype {x.dtype}; expected a numeric (integer or float) array")
    tile = c["tile_size"] or DEFAULT_TILE
    tile = max(m, -(-int(tile) // m) * m)
    mg = c["tile_overlap"] if c["tile_overlap"] is not None else DEFAULT_MARGIN
    mg = -(-int(mg) // m) * m
    spec = ChunkSpec(tuple(int(s) for s in x.shape), tile, mg, c["n_samples"], tuple(modes),
                     c["seed"], c["batch_size"], bool(return_samples),
                     None if device is None else str(device))
    # the training-range warning, from one chunk in the middle of the first frame
    read, _, _ = spec.windows(tuple([0] * (x.ndim - 2) + [g // 2 for g in spec.grid[-2:]]))
    check_training_range(m_obj, as_float_array(read_block(x, read, "in the middle of frame 1")))
    return ref, m_obj, x, ax, spec


def predict_dask(model, image, n_samples: int | str = "auto", *, axes: str | None = None, levels=None,
                 seed: int = 0, batch_size: int | None = None, return_samples: bool = False,
                 tile_size: int | None = None, margin: int | None = None, device=None,
                 channel: int | None = None) -> LazyPrediction:
    """Posterior MMSE and variance (and samples) as lazy dask arrays in the input's shape.

    ``image``: a dask or numpy array, a zarr array, or a path (see :func:`open_array`). Each output
    chunk (one frame, ``tile_size`` pixels square, default 512) is one task reading its block plus
    ``margin`` pixels (default 64) around it. Nothing is computed until the arrays are; computing
    them with a dask.distributed client runs the chunks on its workers, which load the model from
    its file (pass a path, not a model in memory).
    """
    da = _need("dask.array")
    from dask import delayed

    ref, _, x, ax, spec = _prepare(model, image, n_samples, axes, levels, seed, batch_size,
                                   return_samples, tile_size, margin, device, channel)
    grid = spec.grid
    k = 2 + (spec.kept_samples if spec.keep_samples else 0)
    parts = np.empty(grid, dtype=object)
    token = hashlib.sha1(repr((spec, ref.path or id(ref.model), x.name)).encode()).hexdigest()[:12]
    for idx in np.ndindex(*grid):
        read, _, own = spec.windows(idx)
        d = delayed(_chunk_result, pure=True)(x[read], ref, spec, idx,
                                              dask_key_name=f"hdn-chunk-{token}-{'-'.join(map(str, idx))}")
        h, w = own[-2].stop - own[-2].start, own[-1].stop - own[-1].start
        parts[idx] = da.from_delayed(d, shape=(k, *([1] * (x.ndim - 2)), h, w), dtype=np.float32)
    stack = da.block(parts.tolist())
    n = spec.n_samples
    return LazyPrediction(
        mmse=stack[0], variance=stack[1],
        samples=stack[2:] if spec.keep_samples else None,
        levels=list(spec.modes), n_samples=n, seed=spec.seed,
        info={"axes": ax, "tile_size": spec.tile, "margin": spec.margin,
              "chunks": int(np.prod(grid))},
    )


# -- zarr output -----------------------------------------------------------------------------------

_GROUPS: dict = {}


def _out_group(path: str):
    zarr = _need("zarr")
    g = _GROUPS.get(path)
    if g is None:
        g = _GROUPS[path] = zarr.open_group(path, mode="r+")
    return g


def _write_chunk(block, ref: ModelRef, spec: ChunkSpec, idx: tuple, out: str,
                 stop_flag: StopFlag | None = None):
    """Compute one chunk and write it; its ``done`` cell is set only after its data are written."""
    res = compute_chunk(block, ref.get(spec.device), spec, idx, stop_flag)
    _, _, own = spec.windows(idx)
    g = _out_group(out)
    g["mmse"][own] = res[0]
    g["variance"][own] = res[1]
    if spec.keep_samples:
        g["samples"][(slice(None), *own)] = res[2:]
    g["done"][idx] = 1
    return idx


def _run_attrs(spec: ChunkSpec, fingerprint: str, source: str) -> dict:
    return {"kind": STORE_KIND, "version": STORE_VERSION, "model": fingerprint,
            "shape": list(spec.shape), "tile": spec.tile, "margin": spec.margin,
            "n_samples": spec.n_samples, "levels": list(spec.modes), "seed": spec.seed,
            "samples_kept": spec.keep_samples, "input": source}


#: frames and the side of the square read from each for :func:`input_fingerprint`
FINGERPRINT_FRAMES, FINGERPRINT_SIDE = 8, 16


def input_fingerprint(x) -> str:
    """A short hash of the input array ``x`` (dask): its shape, dtype and the pixels of a square at
    the centre of up to 8 evenly spaced frames (a few chunks read, not the image). A store that a
    run with other pixels left is then told apart from one this input left."""
    h = hashlib.sha256(f"{tuple(x.shape)}|{np.dtype(x.dtype).str}".encode())
    lead = tuple(int(v) for v in x.shape[:-2])
    n = int(np.prod(lead)) if lead else 1
    H, W = (int(v) for v in x.shape[-2:])
    side_y, side_x = min(FINGERPRINT_SIDE, H), min(FINGERPRINT_SIDE, W)
    ys = slice((H - side_y) // 2, (H - side_y) // 2 + side_y)
    xs = slice((W - side_x) // 2, (W - side_x) // 2 + side_x)
    for k in np.unique(np.linspace(0, n - 1, min(n, FINGERPRINT_FRAMES)).round().astype(int)):
        idx = np.unravel_index(int(k), lead) if lead else ()
        block = read_block(x, (*map(int, idx), ys, xs), "of the fingerprint")
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()[:32]


#: the settings (and the input) that must match for a store to be resumed, as the message names them
_RUN_KEYS = {"model": "model", "shape": "image shape", "tile": "tile size", "margin": "margin",
             "n_samples": "samples", "levels": "levels", "seed": "seed",
             "samples_kept": "kept samples", "input_pixels": "input pixels"}


def _same_run(old: dict, new: dict) -> list[str]:
    """The names of what differs between the run that made a store (``old``) and this one."""
    return [name for k, name in _RUN_KEYS.items() if old.get(k) != new.get(k)]


def _paths_of(source) -> list[Path]:
    """The file-system paths an input reads from: a path as given (a TIFF, a store, an array
    inside a store), or the folder of a zarr array's local store (and its array path)."""
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    store = getattr(source, "store", None)
    root = getattr(store, "root", None)
    if root is None:
        return []
    path = str(getattr(source, "path", "") or "")
    return [Path(root) / path if path else Path(root)]


def check_not_an_input(out, inputs) -> None:
    """Refuse (:class:`OutputError`) an output store that is an input, lies inside one or holds
    one (an array of an earlier result given as the input): writing it, or replacing it with
    ``--overwrite``, would change or delete what is read. Paths are resolved (symbolic links,
    ``..``) before they are compared; nothing is opened."""
    try:
        o = Path(out).expanduser().resolve()
    except (OSError, RuntimeError):
        return  # a loop: writing it fails with its own message
    for src in inputs:
        for i in _paths_of(src):
            try:
                r = i.expanduser().resolve()
            except (OSError, RuntimeError):
                continue
            if r == o:
                raise OutputError(f"the output {out} is the input: choose another output store "
                                  "(nothing was changed)")
            if o in r.parents:
                raise OutputError(f"the output {out} holds the input {i} (an array inside it): "
                                  "writing or replacing the store would change or delete the "
                                  "input; choose another output store (nothing was changed)")
            if r in o.parents:
                raise OutputError(f"the output {out} lies inside the input {i}: writing it would "
                                  "change the input; choose an output outside it (nothing was "
                                  "changed)")
            root = _store_root(r)
            if root is not None and root != r and root in o.parents:
                raise OutputError(f"the output {out} lies inside the zarr store {root} that holds "
                                  f"the input {i}: writing it would change that store; choose an "
                                  "output outside it (nothing was changed)")


_ZARR_META = ("zarr.json", ".zgroup", ".zarray")


def _store_root(path: Path) -> Path | None:
    """The outermost folder of the zarr store that ``path`` lies in (None: in no store)."""
    root = None
    for d in (path, *path.parents):
        if any((d / m).is_file() for m in _ZARR_META):
            root = d
        elif root is not None:
            break
    return root


def prepare_store(out, spec: ChunkSpec, attrs: dict, axes: str,
                  overwrite: bool = False) -> tuple[np.ndarray, bool]:
    """Create the output store, or open the one a matching earlier run left; return the ``done``
    array (1 = chunk written) and whether the store was resumed. The caller has checked that
    ``out`` is no input (:func:`check_not_an_input`) and holds its lock."""
    import shutil

    zarr = _need("zarr")
    p = Path(out).expanduser()
    p = p.resolve() if p.is_symlink() else p  # a link to a store: the store it names
    if p.exists():
        old = None
        try:
            g = zarr.open_group(str(p), mode="r")
            old = dict(g.attrs).get("napari_hdn")
        except Exception:  # noqa: BLE001 - not a zarr group: handled below
            pass
        if old is None or old.get("kind") != STORE_KIND:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
            else:
                raise OutputError(f"{p} exists and is not a napari-hdn prediction store: choose "
                                  "another output (nothing there was changed)")
        elif overwrite:
            shutil.rmtree(p)
        else:
            diff = _same_run(old, attrs)
            if diff:
                what = ("of another input" if diff == ["input pixels"] else
                        f"with other settings ({', '.join(diff)} differ)")
                raise OutputError(
                    f"{p} holds a prediction made {what}: its chunks cannot be reused or mixed "
                    "with this run's; rerun with the same input, model and settings to resume it, "
                    "add --overwrite (overwrite=True) to start again, or choose another output")
            done = np.asarray(g["done"][...])
            return done, True
    _GROUPS.pop(str(p.resolve()), None)
    try:
        g = zarr.open_group(str(p), mode="w-")
        lead = [1] * (len(spec.shape) - 2)
        ch = (*lead, min(spec.tile, spec.shape[-2]), min(spec.tile, spec.shape[-1]))
        dims = list(axes)
        for name in ("mmse", "variance"):
            g.create_array(name, shape=spec.shape, chunks=ch, dtype="float32", fill_value=np.nan,
                           dimension_names=dims)
        if spec.keep_samples:
            g.create_array("samples", shape=(spec.kept_samples, *spec.shape),
                           chunks=(spec.kept_samples, *ch), dtype="float32", fill_value=np.nan,
                           dimension_names=["sample", *dims])
        g.create_array("done", shape=spec.grid, chunks=(1,) * len(spec.grid), dtype="uint8",
                       fill_value=0)
        g.attrs["napari_hdn"] = attrs
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}") from None
    return np.zeros(spec.grid, np.uint8), False


def predict_to_zarr(model, image, out, n_samples: int | str = "auto", *, axes: str | None = None,
                    levels=None, seed: int = 0, batch_size: int | None = None,
                    return_samples: bool = False, tile_size: int | None = None,
                    margin: int | None = None, device=None, channel: int | None = None,
                    overwrite: bool = False, scheduler=None, workers: int | None = None,
                    callbacks: Callback | list[Callback] | None = None,
                    stop_flag: StopFlag | None = None) -> LazyPrediction:
    """Predict chunk by chunk into the zarr store ``out`` (arrays ``mmse``, ``variance``,
    ``samples`` with ``return_samples``, and ``done``); return dask arrays read from it.

    Runs in this process by default, one chunk at a time (memory: one chunk, not the image).
    ``scheduler``: the address of a dask.distributed scheduler (``"tcp://host:8786"``) or a
    ``distributed.Client``; ``workers=N`` starts a LocalCluster of N single-thread processes. A
    store left by an interrupted run with the same model and settings is resumed (only chunks not
    marked done are computed); ``overwrite=True`` starts again. Progress events (task
    ``"predict-chunks"``) count chunks; a stop keeps the chunks written (``info["stopped"]``).
    """
    _need("dask.array")
    if scheduler is not None and workers is not None:
        raise OptionError("give scheduler= (an existing cluster) or workers= (a LocalCluster), "
                          "not both")
    if workers is not None:
        workers = check_options(workers=workers)["workers"]
    ref, m_obj, x, ax, spec = _prepare(model, image, n_samples, axes, levels, seed, batch_size,
                                       return_samples, tile_size, margin, device, channel)
    if Path(out).suffix.lower() in (".tif", ".tiff", ".hdn", ".hdnoise", ".zip", ".npy"):
        raise OutputError(f"the output {out} would be a zarr store (a folder of chunks) with a "
                          "file's name: give a name ending in .zarr")
    inputs = [image, *([model] if isinstance(model, (str, os.PathLike)) else [])]
    check_not_an_input(out, inputs)  # before the lock file is made next to it
    from ..files.locks import output_lock

    with output_lock(out, "prediction store",
                     "wait for it to finish, or choose another output store"):
        return _predict_locked(image, out, ref, m_obj, x, ax, spec, overwrite,
                               scheduler, workers, callbacks, stop_flag)


def _predict_locked(image, out, ref, m_obj, x, ax, spec, overwrite, scheduler, workers,
                    callbacks, stop_flag) -> LazyPrediction:
    da = _need("dask.array")
    source = str(image) if isinstance(image, (str, os.PathLike)) else "array"
    attrs = _run_attrs(spec, model_fingerprint(m_obj), source)
    attrs["input_pixels"] = input_fingerprint(x)
    meta = _input_meta(image)
    if meta is not None:  # the input's axes, pixel size and units go with the results
        attrs["image"] = meta.for_axes(ax).to_dict()
    done, resumed = prepare_store(out, spec, attrs, ax, overwrite)
    out = str(Path(out).resolve())
    pending = [idx for idx in np.ndindex(*spec.grid) if not done[idx]]
    total = int(np.prod(spec.grid))
    report = Reporter(EventTask.PREDICT_CHUNKS, callbacks)
    before = total - len(pending)
    report(EventKind.START, step=before, total=total)
    stop_flag = stop_flag or StopFlag()
    stopped = False
    if scheduler is None and workers is None:
        stopped = _run_here(x, ref, spec, pending, out, report, before, total, stop_flag)
    else:
        stopped = _run_cluster(x, ref, spec, pending, out, report, before, total, stop_flag,
                               scheduler, workers)
    report(EventKind.STOPPED if stopped else EventKind.DONE, step=total if not stopped else None, total=total)
    import zarr

    g = zarr.open_group(out, mode="r")
    n_done = int(np.asarray(g["done"][...]).sum())
    return LazyPrediction(
        mmse=da.from_zarr(g["mmse"]), variance=da.from_zarr(g["variance"]),
        samples=da.from_zarr(g["samples"]) if spec.keep_samples else None,
        levels=list(spec.modes), n_samples=spec.n_samples, seed=spec.seed,
        info={"axes": ax, "tile_size": spec.tile, "margin": spec.margin, "chunks": total,
              "chunks_before": before, "chunks_run": n_done - before, "chunks_done": n_done,
              "resumed": resumed, "stopped": stopped, "store": out},
    )


def _input_meta(image):
    """The axes, pixel size and units a TIFF or OME-Zarr input declares (None otherwise)."""
    from ..data.imageio import read_tiff_meta, read_zarr_meta

    if not isinstance(image, (str, os.PathLike)):
        return None
    p = Path(image)
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            return read_tiff_meta(p)[2]
        return read_zarr_meta(p)[1]
    except Exception:  # noqa: BLE001 - metadata are a courtesy; the prediction does not need them
        return None


def _run_here(x, ref, spec, pending, out, report, before, total, stop_flag) -> bool:
    done = before
    for idx in pending:
        if stop_flag.is_set():
            return True
        read, _, _ = spec.windows(idx)
        try:
            _write_chunk(read_block(x, read, idx), ref, spec, idx, out, stop_flag)
        except StopRequested:
            return True
        except InputError as exc:  # a bad chunk of the input: what was finished stays usable
            raise InputError(f"{exc} (chunk {idx}); {_kept(done, total, out)}") from None
        done += 1
        report(EventKind.STEP, step=done, total=total)
    return False


def read_block(x, read: tuple, idx: tuple) -> np.ndarray:
    """The input pixels chunk ``idx`` reads, or one line naming the chunk when the store cannot
    give them (a damaged or truncated chunk file, a codec missing here)."""
    try:
        return np.asarray(x[read].compute(scheduler="sync"))
    except _READ_ERRORS as exc:
        where = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in read)
        raise InputError(f"the input cannot be read at chunk {idx} (pixels [{where}]): "
                         f"{_first_line(exc)}; the store is damaged there: copy it again from its "
                         "source") from None


#: what reading a damaged store raises (a codec's error, a truncated file)
_READ_ERRORS = (OSError, RuntimeError, ValueError)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _kept(done: int, total: int, out) -> str:
    """What a store keeps when a run fails part-way, and how to finish it."""
    return (f"the {done} chunks of {total} finished are kept in {out}: fix the input and rerun "
            "the same command to finish the store, or delete it")


def _run_cluster(x, ref, spec, pending, out, report, before, total, stop_flag, scheduler,
                 workers) -> bool:
    from dask import delayed

    dd = _need("distributed")
    if ref.path is None:
        ref.__getstate__()  # raises: a cluster needs the model file
    cluster = None
    if isinstance(scheduler, dd.Client):
        client, own = scheduler, False
    else:
        if workers is not None:
            cluster = dd.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None)
            scheduler = cluster
        try:
            client, own = dd.Client(scheduler, timeout="30s"), True
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the dask scheduler at {scheduler} ({exc}): check the "
                             "address (tcp://HOST:8786) and that the scheduler is running") from None
    try:
        tasks = []
        for idx in pending:
            read, _, _ = spec.windows(idx)
            tasks.append(delayed(_write_chunk, pure=False)(x[read], ref, spec, idx, out))
        futures = client.compute(tasks)
        done = before
        for fut in dd.as_completed(futures):
            if stop_flag.is_set():
                client.cancel(futures)
                return True
            try:
                fut.result()  # a chunk that failed raises here, with the worker's message
            except HDNError as exc:
                raise type(exc)(f"{exc}; {_kept(done, total, out)}") from None
            except _READ_ERRORS as exc:  # the worker could not read the input
                raise InputError(f"a worker could not compute a chunk: {_first_line(exc)}; "
                                 f"{_kept(done, total, out)}") from None
            done += 1
            report(EventKind.STEP, step=done, total=total)
        return False
    finally:
        if own:
            client.close()
        if cluster is not None:
            cluster.close()
