"""Zoo models: shipped trained weights, torchvision-compatible keys, reproducible training."""
import pytest
import torch

import lepton_edge
from lepton_edge import zoo
from lepton_edge.errors import BadInput

# First and last keys of torchvision.models.mobilenet_v2().state_dict() (314 entries, 3,504,872 parameters).
TV_KEYS = ["features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
           "features.2.conv.0.0.weight", "features.2.conv.1.0.weight", "features.2.conv.2.weight",
           "features.2.conv.3.running_mean", "features.18.0.weight", "features.18.1.num_batches_tracked",
           "classifier.1.weight", "classifier.1.bias"]


def test_mobilenetv2_matches_torchvision_layout(tmp_path):
    m = zoo.get("mobilenetv2").load()
    sd = m.state_dict()
    assert len(sd) == 314 and sum(p.numel() for p in m.parameters()) == 3_504_872
    for k in TV_KEYS:
        assert k in sd, k
    # A torchvision-style checkpoint (here: ours, re-initialised) loads through --weights.
    torch.manual_seed(1)
    other = zoo.get("mobilenetv2").build()
    ckpt = tmp_path / "mobilenet_v2.pth"
    torch.save(other.state_dict(), ckpt)
    loaded = zoo.get("mobilenetv2").load(str(ckpt))
    assert torch.equal(loaded.state_dict()["classifier.1.weight"], other.state_dict()["classifier.1.weight"])


def test_mismatched_checkpoint_lists_keys(tmp_path):
    sd = zoo.get("mobilenetv2").build().state_dict()
    sd.pop("classifier.1.bias")
    sd["extra.weight"] = torch.zeros(1)
    f = tmp_path / "bad.pth"
    torch.save(sd, f)
    with pytest.raises(BadInput, match=r"missing keys classifier.1.bias; unexpected keys extra.weight"):
        zoo.get("mobilenetv2").load(str(f))


def test_unknown_zoo_name():
    with pytest.raises(BadInput, match="did you mean: fashion-cnn"):
        zoo.get("zoo:fashion-cn")


def test_training_is_reproducible():
    from lepton_edge.zoo.train import train

    a = train("fashion-cnn", epochs=1, seed=3, limit=1024, progress=False)
    b = train("fashion-cnn", epochs=1, seed=3, limit=1024, progress=False)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_shipped_weights_are_trained(fashion):
    from lepton_edge.runtime.preprocess import normalise

    x, y = fashion
    for name, floor in (("fashion-cnn", 0.85), ("mobilenetv2-fashion", 0.85)):
        e = zoo.get(name)
        with torch.no_grad():
            pred = e.load()(torch.from_numpy(normalise(x[:2000, ..., None], e.input_spec()))).argmax(1).numpy()
        assert (pred == y[:2000]).mean() > floor, name


def test_mobilenetv2_fashion_int8_under_1mb(tmp_path):
    r = lepton_edge.export("zoo:mobilenetv2-fashion", target="x86-cpu", max_size="1MB", out=tmp_path,
                           eval_limit=2000)
    assert r.report["bytes"] < 1_000_000
    assert r.manifest.validation["accuracy_drop_pp"] <= 0.5
