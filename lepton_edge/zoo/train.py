"""Train the zoo's Fashion-MNIST models and write the weights that ship in the package.

    python -m lepton_edge.zoo.train fashion-cnn            # writes lepton_edge/zoo/weights/fashion-cnn.pt
    python -m lepton_edge.zoo.train mobilenetv2-fashion --epochs 3

Why in the repo: the shipped weights must be reproducible. A fixed seed, deterministic
algorithms and a fixed thread count give the same weights on the same machine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def train(name: str, epochs: int | None = None, seed: int = 0, out: Path | None = None,
          limit: int | None = None, progress: bool = True) -> dict:
    import torch
    from rich.progress import Progress

    from lepton_edge import zoo
    from lepton_edge.runtime.preprocess import normalise

    entry = zoo.get(name)
    recipe = dict(entry.train)
    epochs = epochs or recipe["epochs"]
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    rng = np.random.default_rng(seed)
    spec = entry.input_spec()

    xs, ys = entry.data("train")
    if limit:
        xs, ys = xs[:limit], ys[:limit]
    x_all = torch.from_numpy(normalise(xs[..., None], spec))
    y_all = torch.from_numpy(ys)
    model = entry.build().train()
    steps = epochs * ((len(xs) + recipe["batch"] - 1) // recipe["batch"])
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"training {name}", total=steps)
        for _ in range(epochs):
            order = rng.permutation(len(xs))
            for i in range(0, len(order), recipe["batch"]):
                idx = torch.from_numpy(order[i:i + recipe["batch"]])
                xb, yb = x_all[idx], y_all[idx]
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(task, advance=1, description=f"training {name} loss {loss.item():.3f}")
    model.eval()
    xt, yt = entry.data("test")
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(normalise(xt[i:i + 1000, ..., None], spec))).argmax(1)
                          for i in range(0, len(xt), 1000)])
    acc = float((pred.numpy() == yt).mean())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)
    return {"model": name, "epochs": epochs, "seed": seed, "test_accuracy": acc, "state_dict": model.state_dict()}


def main() -> None:
    from lepton_edge import zoo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=[n for n, m in zoo.MODELS.items() if m.weights])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    out = a.out or Path(__file__).parent / "weights" / zoo.get(a.name).weights
    r = train(a.name, a.epochs, a.seed, out)
    print(f"{a.name}: test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs -> {out}")


if __name__ == "__main__":
    main()
