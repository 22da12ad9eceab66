"""Calibration and evaluation data, always passed through the manifest's preprocessing.

Sources a user can give: an image folder (or glob), a `.npy`/`.npz` file (preprocessed tensors
or raw uint8 images), a video file (frames sampled evenly), or the zoo model's own data set.
Synthetic data is only a last resort: int8 ranges from noise change nearly every prediction,
so int8 refuses it unless forced.
"""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton_edge import array_files as af
from lepton_edge.bundle import InputSpec
from lepton_edge.errors import BadInput, CheckFailed
from lepton_edge.memory import available_bytes, rss_bytes  # noqa: F401 (read here by the export's callers)
from lepton_edge.runtime.preprocess import normalise, preprocess_batch, to_pixels

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}


class PixelInputs:
    """Model inputs held as the uint8 pixels they were made from (resized, [N,H,W,C]), normalised
    when read.

    Why: an export keeps its calibration and validation inputs for its whole run, and a 1x3x800x608
    float32 input is 5.8 MB: PicoDet-layout's 72 pages and 56 validation views were ~750 MB, what
    lifted that export's peak above NNCF's own script. As pixels they take a quarter.

    Reading an item or a slice gives the array the model takes (exactly `preprocess_batch`'s), one
    batch at a time; anything else numpy does with it (np.asarray, np.concatenate, arithmetic) sees
    the whole float array, so code written for arrays stays correct. `subset` and `concat` keep pixels.
    """

    def __init__(self, pixels: np.ndarray, spec: InputSpec):
        self.pixels, self.spec = pixels, spec
        one = normalise(pixels[:1], spec)
        self.dtype: np.dtype = one.dtype
        self.shape: tuple[int, ...] = (len(pixels), *one.shape[1:])

    ndim = property(lambda self: len(self.shape))
    itemsize = property(lambda self: self.dtype.itemsize)
    size = property(lambda self: int(np.prod(self.shape)))
    nbytes = property(lambda self: self.size * self.itemsize)  # as the float array it stands for

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return normalise(self.pixels[key][None], self.spec)[0]
        if isinstance(key, slice):
            return normalise(self.pixels[key], self.spec)
        return np.asarray(self)[key]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = normalise(self.pixels, self.spec)
        return x if dtype is None else x.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def subset(self, start: int | None = None, stop: int | None = None) -> PixelInputs:
        """Inputs start..stop, still as pixels."""
        return PixelInputs(self.pixels[start:stop], self.spec)

    @staticmethod
    def concat(parts: list[PixelInputs]) -> PixelInputs:
        return PixelInputs(np.concatenate([p.pixels for p in parts]), parts[0].spec)


def subset(x, start: int | None = None, stop: int | None = None):
    """x[start:stop], kept as pixels when x is PixelInputs (a plain slice of one is the float array)."""
    return x.subset(start, stop) if isinstance(x, PixelInputs) else x[start:stop]


def pixel_inputs(images, spec: InputSpec) -> PixelInputs:
    """Frames (any size, BGR or gray) -> PixelInputs at the model's input size."""
    return PixelInputs(np.stack([to_pixels(im, spec) for im in images]), spec)


@dataclass
class Samples:
    """Model-ready inputs and where they came from (recorded in the manifest)."""

    x: np.ndarray | PixelInputs  # PixelInputs for images and video frames
    source: str
    kind: str  # "images" | "array" | "video" | "zoo" | "synthetic"
    y: np.ndarray | None = None


def _image_files(src: str) -> list[Path]:
    p = Path(src)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    else:
        files = sorted(Path(f) for f in glob.glob(src) if Path(f).suffix.lower() in IMAGE_EXTS)
    return files


def _read_images(files: list[Path], spec: InputSpec) -> PixelInputs:
    return _read_images_kept(files, spec)[0]


def _read_images_kept(files: list[Path], spec: InputSpec) -> tuple[PixelInputs, list[int]]:
    """The files as model-sized pixels, each written straight into one array (a list of resized images
    stacked after would hold every image twice: 7 GB for 72 photos at 4096x4096)."""
    import cv2

    h, w = spec.hw()
    out = np.empty((len(files), h, w, spec.channels), np.uint8)
    n, kept = 0, []  # kept: the indices of the files read (a labelled set keeps their labels only)
    for i, f in enumerate(files):
        try:
            im = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        except cv2.error:  # a header past OpenCV's pixel limit (40000x40000 in 69 bytes): skipped, as run skips it
            im = None
        if im is None:
            continue  # unreadable image: skip, a folder of mostly good images still calibrates
        if im.dtype != np.uint8:
            im = cv2.convertScaleAbs(im, alpha=255.0 / max(1, int(im.max())))
        out[n] = to_pixels(im, spec)
        n += 1
        kept.append(i)
    if not n:
        raise BadInput(f"none of the {len(files)} image files could be decoded")
    if n < len(files):  # (a slice would keep every skipped file's room: shrunk where it lies instead)
        out.resize((n, h, w, spec.channels), refcheck=False)
    return PixelInputs(out, spec), kept


def count_inputs(src: str, limit: int | None = None) -> int | None:
    """How many inputs `load_inputs(src, ..., limit)` would read from an image folder or glob (None for
    an array or a video: an array is already in memory as what it is, a video is read up to `limit`)."""
    p = Path(src)
    if p.suffix.lower() in (".npy", ".npz"):
        return None
    if p.suffix.lower() in VIDEO_EXTS:
        return limit
    n = len(_image_files(src)) if p.exists() or any(c in src for c in "*?[") else 0
    return min(n, limit) if limit else n


def _usable_array(arr: np.ndarray, src: str) -> None:
    """One line for an array no model input can come from: a scalar, no samples, not numbers, values
    that are not finite (NaN inputs give NaN outputs, and NaN compares as 'the same' everywhere: an
    all-NaN .npy once passed validation with agreement 1.0)."""
    if arr.ndim == 0 or len(arr) == 0:
        raise BadInput(f"{src}: {'a scalar' if arr.ndim == 0 else 'no samples'} (shape {list(arr.shape)}); "
                       "give [N, ...] model inputs or [N,H,W(,C)] uint8 images")
    if arr.dtype.kind not in "biuf":
        raise BadInput(f"{src}: an array of {arr.dtype}, not numbers")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadInput(f"{src}: {int((~np.isfinite(arr)).sum())} values are NaN or infinite")


def _check_labels(y: np.ndarray | None, n: int, src: str) -> None:
    """Labels of a labelled set (--eval, --train) pair with its inputs: one integer class index each.
    (Calibration ignores labels: a Keras-style one-hot y or a detector's targets are no reason to refuse.)"""
    integral = y is not None and (y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.isfinite(y).all()
                                                            and bool((y == np.round(y)).all())))
    if y is not None and (y.ndim != 1 or len(y) != n or not integral):
        raise BadInput(f"{src}: labels of shape {list(y.shape)} ({y.dtype}) do not pair with {n} inputs: "
                       "give one integer class index an input")


def _from_array(arr: np.ndarray, spec: InputSpec, src: str) -> np.ndarray:
    """Accept model-shaped tensors, or raw uint8 images [N,H,W] / [N,H,W,C]."""
    want = [d for d in spec.shape[1:]]
    if arr.ndim == len(spec.shape) and all(isinstance(w, str) or w == a for w, a in zip(want, arr.shape[1:])):
        return arr.astype(spec.dtype if not spec.quantization else np.float32)
    if arr.ndim == len(spec.shape) - 1 and all(isinstance(w, str) or w == a for w, a in zip(want, arr.shape)):
        return arr[None].astype(np.float32)
    batch1 = not isinstance(spec.shape[0], int) or spec.shape[0] == 1
    if batch1 and arr.ndim == len(spec.shape) + 1 and arr.shape[1] == 1 \
            and all(isinstance(w, str) or w == a for w, a in zip(want, arr.shape[2:])):
        return _from_array(arr[:, 0], spec, src)  # a stack of whole batch-1 inputs, [N,1,...]
    c_axis = 1 if spec.layout == "NCHW" else 3
    hw = [d for i, d in enumerate(want, 1) if i != c_axis]
    if arr.dtype != np.uint8 and len(spec.shape) == 4 and spec.shape[c_axis] == 1 and arr.ndim == 3 \
            and all(isinstance(w, str) or w == a for w, a in zip(hw, arr.shape[1:])):
        # [N,H,W] tensors of a gray input: a 3-D model's own inputs (frame_input.py: it takes [N,1,H,W] now)
        return np.expand_dims(arr, c_axis).astype(spec.dtype if not spec.quantization else np.float32)
    if arr.dtype == np.uint8 and arr.ndim in (3, 4):
        return preprocess_batch(list(arr), spec) if arr.shape[1:3] != spec.hw() else normalise(
            arr[..., None] if arr.ndim == 3 else arr, spec)
    raise BadInput(
        f"{src}: array of shape {list(arr.shape)} fits neither the model input {spec.shape} "
        "nor raw uint8 images [N,H,W(,C)]"
    )


def _read_array_file(p: Path, src: str, limit: int | None, labelled: bool,
                     max_bytes: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(the first `limit` inputs, the labels or None) of a .npy or .npz, read from each array's header on:
    only the rows used are read (and, in a .npz, decompressed); see lepton_edge/array_files.py."""
    import zipfile

    try:
        if p.suffix.lower() == ".npy":
            with open(p, "rb") as f:
                return _read_npy(f, src, limit, max_bytes)[0], None
        with zipfile.ZipFile(p) as z:
            found = af.members(z, src)
            key = af.input_member(found)
            if key not in af.INPUT_NAMES and len(found) > 1:
                import logging

                logging.getLogger(__name__).warning(f"{src}: no array named x, images or inputs: using {key!r}, the "
                                                    f"first of {', '.join(list(found)[:8])}")
            with z.open(found[key]) as f:
                arr, total = _read_npy(f, src, limit, max_bytes)
            ykey = next((k for k in af.LABEL_NAMES if k in found), None)
            if ykey is None:
                return arr, None
            with z.open(found[ykey]) as f:
                y, ytotal = _read_npy(f, src, limit if labelled else 1, max_bytes)
            if labelled and ytotal != total:
                raise BadInput(f"{src}: labels of shape [{ytotal}, ...] ({y.dtype}) do not pair with {total} inputs: "
                               "give one integer class index an input")
            return arr, y
    except (BadInput, CheckFailed):
        raise
    except Exception as e:
        raise BadInput(f"cannot read {src}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def _read_npy(f, src: str, limit: int | None, max_bytes: int | None) -> tuple[np.ndarray, int]:
    """(the first `limit` rows, the rows there are) of the .npy array in stream `f`, its size checked
    against `max_bytes` (as float32 model inputs at least: uint8 images grow 4x) before any row is read."""
    shape, fortran, dtype = af.read_header(f, src)
    total = shape[0] if shape else 1
    rows = total if not limit or fortran else min(total, limit)
    need = rows * af.row_items(shape) * max(dtype.itemsize, 4)
    if max_bytes and need > max_bytes:
        from lepton_edge.ui import human

        raise CheckFailed(f"{src}: {rows} inputs of {list(shape[1:])} {dtype} would take {human(need)} as model "
                          f"inputs, over half the export's memory budget ({human(2 * max_bytes)}, --max-memory): "
                          "use fewer --calib-samples (--eval-limit with --eval), or a smaller array")
    out = np.empty((rows, *shape[1:]) if shape else (), dtype)
    af.read_into(f, out, src)
    if fortran and out.ndim > 1:
        out = out.reshape(shape[::-1]).T  # (a Fortran-order file holds the transposed C array)
    return (out[:limit] if limit and shape else out), total


def _read_video(path: Path, spec: InputSpec, n: int) -> PixelInputs:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise BadInput(f"cannot open video {path}")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or n
    want = set(np.linspace(0, max(total - 1, 0), num=min(n, max(total, 1)), dtype=int).tolist())
    frames, i = [], 0
    while len(frames) < len(want):
        ok, frame = cap.read()
        if not ok:
            break
        if i in want:
            frames.append(frame)
        i += 1
    cap.release()
    if not frames:
        raise BadInput(f"video {path} has no decodable frames")
    return pixel_inputs(frames, spec)


def load_inputs(src: str, spec: InputSpec, limit: int | None = None, labelled: bool = False,
                max_bytes: int | None = None) -> Samples:
    """Inputs from a folder/glob of images, a .npy/.npz, or a video file. `max_bytes`: the most the
    inputs read from an array file may take as model inputs (half the export's memory budget)."""
    p = Path(src)
    ext = p.suffix.lower()
    if ext in (".npy", ".npz"):
        if not p.is_file():
            raise BadInput(f"calibration file not found: {src}")
        arr, y = _read_array_file(p, src, limit, labelled, max_bytes)
        _usable_array(arr, src)
        if labelled:
            _check_labels(y, len(arr), src)
        x = _from_array(arr, spec, src)
        return Samples(x, str(p), "array", None if y is None or not labelled else np.asarray(y[: len(x)], np.int64))
    if ext in VIDEO_EXTS:
        if not p.is_file():
            raise BadInput(f"video not found: {src}")
        return Samples(_read_video(p, spec, limit or 100), str(p), "video")
    if not p.exists() and not any(c in src for c in "*?["):
        raise BadInput(f"calibration source not found: {src}")
    files = _image_files(src)
    if not files:
        raise BadInput(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in {src}")
    if limit and len(files) > limit:  # spread the pick over the whole folder, not its first class
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit, dtype=int)]
    return Samples(_read_images(files, spec), src, "images")


def load_labelled(src: str, spec: InputSpec, labels: list[str] | None, limit: int | None = None,
                  max_bytes: int | None = None) -> Samples:
    """An evaluation set: folder of class sub-folders (ImageFolder layout) or .npz with x and y.

    Class folders are matched to the model's labels by name, else by sorted order.
    """
    p = Path(src)
    if p.suffix.lower() == ".npz":
        s = load_inputs(src, spec, limit, labelled=True, max_bytes=max_bytes)
        if s.y is None:
            raise BadInput(f"{src}: an evaluation .npz needs a 'y' (or 'labels') array")
        return s
    if not p.is_dir():
        raise BadInput(f"evaluation set not found (want a folder of class folders or a .npz): {src}")
    classes = sorted(d.name for d in p.iterdir() if d.is_dir())
    if not classes:
        raise BadInput(f"{src}: no class sub-folders (expected {src}/<class>/<image>)")
    cls_index = _class_indices(src, classes, labels) if labels else {c: i for i, c in enumerate(classes)}
    files, ys = [], []
    for c in classes:
        for f in _image_files(str(p / c)):
            files.append(f)
            ys.append(cls_index[c])
    if not files:
        raise BadInput(f"no images found under {src}/<class>/")
    if limit and len(files) > limit:
        pick = np.linspace(0, len(files) - 1, limit, dtype=int)
        files, ys = [files[i] for i in pick], [ys[i] for i in pick]
    x, kept = _read_images_kept(files, spec)  # (an unreadable image takes its label with it)
    return Samples(x, src, "images", np.asarray(ys, np.int64)[kept])


def _class_indices(src: str, classes: list[str], labels: list[str]) -> dict[str, int]:
    """Class folder -> the model's class index: by label name when every folder is named after a label;
    by number when every folder is a class index; else by sorted order, said in a warning. Why strict:
    a mix (some folders named after labels, some not) once fell back to sorted order without a word,
    and the accuracy measured was of a wrong mapping."""
    import logging

    norm = {_norm(name): i for i, name in enumerate(labels)}
    named = [c for c in classes if _norm(c) in norm]
    if len(named) == len(classes):
        return {c: norm[_norm(c)] for c in classes}
    if named:
        raise BadInput(f"{src}: class folders {', '.join(c for c in classes if c not in named)[:200]} match no label, "
                       f"and {', '.join(named)[:200]} do: name every folder after a label (or every one by its index)")
    if all(c.isdigit() for c in classes):
        return {c: int(c) for c in classes}
    mapping = {c: i for i, c in enumerate(classes)}
    logging.getLogger(__name__).warning(
        "%s: class folders match no label name; taken in sorted order: %s", src,
        ", ".join(f"{c} -> {labels[i] if i < len(labels) else i}" for c, i in list(mapping.items())[:10]))
    return mapping


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


SYNTHETIC_CHUNK = 1 << 24  # random values drawn at a time (float64: 128 MiB), written into float32


def synthetic_bytes(spec: InputSpec, n: int) -> int:
    """What `synthetic(spec, n)` allocates: n float32 inputs (a dynamic dimension taken as 1)."""
    return n * math.prod(d if isinstance(d, int) else 1 for d in spec.shape[1:]) * 4


def synthetic(spec: InputSpec, n: int, seed: int = 0, max_bytes: int | None = None) -> Samples:
    """`n` random float32 inputs, drawn a chunk at a time into their array (one draw of them all was
    float64: twice the size, 24 GB for 64 inputs of 1x3x4096x4096). Refused (one line) over `max_bytes`,
    else what this machine has available. The values are those of one standard_normal draw of them all."""
    from lepton_edge.ui import human

    shape = [n] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    need = synthetic_bytes(spec, n)
    limit = max_bytes or default_memory_budget()
    if limit and need > limit:
        raise CheckFailed(f"{n} random inputs of {shape[1:]} would take {human(need)}, over the "
                          f"{human(limit)} memory budget (--max-memory): use fewer --calib-samples or --holdout")
    if np.issubdtype(np.dtype(spec.dtype), np.integer) and len(spec.shape) == 4:
        # integer pixels a model normalises itself (uint8): random pixels through the input's own normalisation,
        # so they reach the model in its type (float32 draws failed in onnxruntime)
        h, w = spec.hw()
        pixels = np.random.default_rng(seed).integers(0, 256, (n, h, w, spec.channels), dtype=np.uint8)
        return Samples(PixelInputs(pixels, spec), "synthetic", "synthetic")
    x = np.empty(shape, np.float32)
    flat, rng = x.reshape(-1), np.random.default_rng(seed)
    for i in range(0, flat.size, SYNTHETIC_CHUNK):
        flat[i:i + SYNTHETIC_CHUNK] = rng.standard_normal(min(SYNTHETIC_CHUNK, flat.size - i))
    if spec.dtype != "float32":  # (a float16 input: the same draw in its type)
        x = x.astype(spec.dtype)
    return Samples(x, "synthetic", "synthetic")


# --- memory budget -------------------------------------------------------------------------------

class MemoryExceeded(Exception):
    """The export went over its --max-memory budget; the message is the one line to show. `watch`: the
    MemoryWatch that saw it, which a caller that can go on with less memory re-arms (MemoryWatch.rearm)."""

    def __init__(self, message: str, watch: MemoryWatch | None = None):
        super().__init__(message)
        self.watch = watch


def default_memory_budget() -> int | None:
    """This process's RSS ceiling when none is given: what it holds now plus what the machine has
    available, less a margin (10 %, at least 256 MiB) for everything else running there."""
    avail = available_bytes()
    if avail is None:
        return None
    margin = max(256 << 20, avail // 10)
    return rss_bytes() + max(avail - margin, 64 << 20)


class MemoryWatch:
    """A watchdog thread sampling this process's RSS while a candidate calibrates and validates.

    Why a thread and a check: onnxruntime runs a batch in native code that Python cannot interrupt,
    so the thread records the peak (reported in the manifest) and flags an excess, and `check()`,
    called between calibration batches, raises MemoryExceeded so the candidate stops there and the
    memory is freed, instead of the kernel's OOM killer taking the whole export (or the machine).
    """

    def __init__(self, limit: int | None, interval: float = 0.02, what: str = "calibration"):
        import threading

        self.limit, self.interval, self.what = limit, interval, what
        self.peak = rss_bytes()
        self.exceeded_at: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lepton-memory-watch", daemon=True)

    def _sample(self) -> int:
        r = rss_bytes()
        self.peak = max(self.peak, r)
        if self.limit and r > self.limit and self.exceeded_at is None:
            self.exceeded_at = r
        return r

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def check(self) -> None:
        """Raise MemoryExceeded when the budget was exceeded since the watch started."""
        self._sample()
        if self.exceeded_at is not None:
            from lepton_edge.ui import human

            raise MemoryExceeded(f"{self.what} reached {human(self.exceeded_at)} of memory, over the "
                                 f"{human(self.limit)} budget (--max-memory)", self)

    def rearm(self) -> None:
        """Forget an excess already raised (the peak stays): for a caller that stopped the work that went
        over and now tries one that needs less, checked against the same budget from here on."""
        self.exceeded_at = None

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sample()
