"""Fashion-MNIST accuracy of exported int8 bundles, measured by the bench itself (BENCHMARKS.md's first table).

Why not the manifest's figures: the exporter refuses a bundle whose drop or agreement misses the
same thresholds the table gates on, so a table that reads them back can only say PASS. Here the
bundle the exporter wrote runs through the device runtime (`Runtime.load`, `preprocess`, `infer`:
what `lepton-edge run` does) on the 10,000 test images, the fp32 PyTorch model runs on the same
images with the bench's own preprocessing (the zoo model's mean/std, nothing from the exporter), and
accuracy, drop and top-1 agreement are computed from those predictions. The exporter's own
figures are printed beside them, so a disagreement between the two shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import lepton_edge

GATE_DROP_PP, GATE_AGREEMENT = 0.5, 0.99


def torch_predictions(model: str, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Top-1 of the zoo's fp32 PyTorch model: uint8 [N,H,W] -> /255 -> (x - mean) / std -> NCHW."""
    import torch

    from lepton_edge import zoo

    z = zoo.get(model)
    net = z.load()
    mean, std = float(z.mean[0]), float(z.std[0])
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = (images[i:i + batch].astype(np.float32) / 255 - mean) / std
            out.append(net(torch.from_numpy(x[:, None])).argmax(1).numpy())
    return np.concatenate(out)


def runtime_predictions(bundle: Path, images: np.ndarray) -> np.ndarray:
    """Top-1 of the bundle run by the device runtime, one image at a time as on a device."""
    from lepton_edge.runtime import Runtime

    rt = Runtime.load(bundle, threads=1)
    return np.array([int(np.asarray(rt.infer(rt.preprocess(im))[0]).reshape(-1).argmax()) for im in images])


def table(out: Path) -> tuple[str, list[str], list[list[str]]]:
    from lepton_edge.datasets import fashion_mnist

    x, y = fashion_mnist("test")
    rows = []
    for model in ("fashion-cnn", "mobilenetv2-fashion"):
        ref = torch_predictions(model, x)
        acc32 = float((ref == y).mean())
        for target in ("x86-cpu", "rpi4"):
            r = lepton_edge.export(f"zoo:{model}", target=target, out=out, measure_latency=False)
            v, c = r.manifest.validation, r.manifest.compression
            pred = runtime_predictions(r.bundle.path, x)
            acc8, agree = float((pred == y).mean()), float((pred == ref).mean())
            drop = 100 * (acc32 - acc8)
            ok = drop <= GATE_DROP_PP and agree >= GATE_AGREEMENT and (
                model != "mobilenetv2-fashion" or r.report["bytes"] < 1e6)
            rows.append([model, f"{target} ({r.manifest.format})", c["quantization"]["recipe"], f"{acc32:.4f}",
                         f"{acc8:.4f}", f"{drop:+.2f}", f"{agree:.4f}",
                         f"{v['accuracy_drop_pp']:+.2f} / {v['top1_agreement']:.4f}",
                         f"{r.report['bytes'] / 1e6:.3f} MB", f"{r.report['bytes'] / r.report['fp32_bytes']:.3f}",
                         "PASS" if ok else "FAIL"])
    return ("Fashion-MNIST accuracy, full 10,000-image test set, measured by the bench: the int8 bundle run by the "
            "device runtime (`Runtime.load` + `preprocess` + `infer`) vs the fp32 PyTorch model run by the bench on "
            "the same images; the exporter's own figures beside (bench/fashion_bench.py)",
            ["model", "target", "int8 recipe", "fp32 acc", "int8 acc", "drop pp", "top-1 agreement",
             "exporter said: drop / agreement", "int8 file", "size vs fp32",
             f"drop <= {GATE_DROP_PP} pp, agreement >= {GATE_AGREEMENT}, MobileNetV2 file < 1 MB"], rows)
