"""NNCF's pattern matching with node types compared first (compress/nncf_matching.py): real NNCF and
networkx, the same matches and the same quantized graph, with far fewer of VF2's edge-count tests."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nncf")
from nncf.common.graph import graph_matching  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lepton_edge.compress import nncf_matching  # noqa: E402


def _model(blocks: int = 6):
    """Conv -> BatchNorm -> Relu/HardSwish blocks with a residual Add every other block: NNCF fuses
    Conv+BN+activation, Add+activation and the like, so several patterns match, some overlapping."""
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", 4
    for i in range(blocks):
        w = numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32), f"w{i}")
        scale, bias, mean, var = (numpy_helper.from_array(a.astype(np.float32), f"{n}{i}") for n, a in (
            ("s", rng.uniform(0.5, 1.5, c)), ("b", rng.normal(0, 0.1, c)), ("m", rng.normal(0, 0.1, c)),
            ("v", rng.uniform(0.5, 1.5, c))))
        inits += [w, scale, bias, mean, var]
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                                      [f"n{i}"], name=f"bn{i}"))
        act = ("HardSwish", "Relu", "Sigmoid", "LeakyRelu")[i % 4]
        nodes.append(helper.make_node(act, [f"n{i}"], [f"a{i}"], name=f"act{i}"))
        out = f"a{i}"
        if i % 2:
            nodes.append(helper.make_node("Add", [out, x], [f"r{i}"], name=f"add{i}"))
            nodes.append(helper.make_node("Relu", [f"r{i}"], [f"rr{i}"], name=f"addrelu{i}"))
            out = f"rr{i}"
        x = out
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="pool"))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantized(model) -> bytes:
    import nncf

    from lepton_edge.compress.quantize import no_nncf_telemetry

    no_nncf_telemetry()
    xs = [np.random.default_rng(i).uniform(-1, 1, (1, 4, 16, 16)).astype(np.float32) for i in range(3)]
    return nncf.quantize(model, nncf.Dataset(xs, lambda x: {"x": x}), subset_size=3).SerializeToString()


class _Counted:
    """Counts the edge-count tests (`syntactic_feasibility`) of whichever matcher class NNCF uses."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self._mp = monkeypatch

    def watch(self, cls) -> None:
        original = cls.syntactic_feasibility

        def counted(matcher, a, b):
            self.calls += 1
            return original(matcher, a, b)

        self._mp.setattr(cls, "syntactic_feasibility", counted)


@pytest.mark.slow
def test_nncf_quantizes_to_the_same_bytes_with_far_fewer_edge_count_tests(monkeypatch):
    import networkx.algorithms.isomorphism as ism

    # NNCF as it comes, whatever an earlier export in this process installed (put back after the test)
    monkeypatch.setattr(graph_matching, "ism", ism)
    model = _model()
    plain_count = _Counted(monkeypatch)
    plain_count.watch(ism.DiGraphMatcher)  # (MultiDiGraphMatcher inherits it)
    plain = _quantized(model)

    assert nncf_matching.install() and nncf_matching.install()  # (a second call changes nothing)
    matcher = graph_matching.ism.MultiDiGraphMatcher
    assert matcher is not ism.MultiDiGraphMatcher and issubclass(matcher, ism.MultiDiGraphMatcher)
    assert graph_matching.ism.is_isomorphic is ism.is_isomorphic  # every other name is networkx's own
    fast_count = _Counted(monkeypatch)
    fast_count.watch(ism.DiGraphMatcher)
    fast = _quantized(model)

    assert fast == plain
    assert plain_count.calls > 0
    assert fast_count.calls * 3 < plain_count.calls, (fast_count.calls, plain_count.calls)


def test_the_same_subgraphs_in_the_same_order_for_every_fused_pattern_of_the_onnx_backend(monkeypatch):
    """Straight on NNCF's matching function, with its ONNX backend's fused patterns, on the graph that
    NNCF's quantizer matches them on: the lists of matched subgraphs are equal (the matching is greedy,
    so the order decides which of two overlapping matches is kept)."""
    import networkx.algorithms.isomorphism as ism
    from nncf.common.graph.patterns.manager import PatternsManager
    from nncf.common.insertion_point_graph import InsertionPointGraph
    from nncf.common.utils.backend import BackendType
    from nncf.onnx.graph.nncf_graph_builder import GraphConverter
    from nncf.parameters import TargetDevice

    monkeypatch.setattr(graph_matching, "ism", ism)  # (NNCF as it comes, as above)
    nx_graph = InsertionPointGraph(GraphConverter.create_nncf_graph(_model())).get_base_nx_graph()
    patterns = PatternsManager.get_full_hw_pattern_graph(backend=BackendType.ONNX, device=TargetDevice.CPU)
    plain = graph_matching.find_subgraphs_matching_pattern(nx_graph, patterns)
    assert sum(len(m) > 1 for m in plain) >= 3, "the model was built so NNCF's patterns match it"
    nncf_matching.install()
    assert graph_matching.ism.MultiDiGraphMatcher is not ism.MultiDiGraphMatcher
    assert graph_matching.find_subgraphs_matching_pattern(nx_graph, patterns) == plain


def test_a_pattern_naming_a_type_the_graph_lacks_is_not_searched(monkeypatch):
    """The pre-check (nncf_matching._types_present): a pattern whose node names only types absent from the
    graph matches nothing, so VF2 is not run for it; a pattern node of any type, or a type the graph has
    under its metatype, does not stop it. Over the ONNX backend's fused patterns on the test graph VF2 runs
    for fewer patterns, and the matches are NNCF's own (the test above)."""
    import networkx as nx
    import networkx.algorithms.isomorphism as ism
    from nncf.common.graph.patterns.manager import PatternsManager
    from nncf.common.insertion_point_graph import InsertionPointGraph
    from nncf.common.utils.backend import BackendType
    from nncf.onnx.graph.nncf_graph_builder import GraphConverter
    from nncf.parameters import TargetDevice

    g = nx.MultiDiGraph()
    g.add_node(0, type="conv", metatype="ConvMeta")
    g.add_node(1, type="relu")
    g.add_edge(0, 1)

    def pattern(*types):
        p = nx.MultiDiGraph()
        for i, t in enumerate(types):
            p.add_node(i, type=list(t), label=str(i))
            if i:
                p.add_edge(i - 1, i)
        return p

    assert nncf_matching._types_present(g, pattern(["conv", "matmul"], ["relu"]))
    assert nncf_matching._types_present(g, pattern(["ConvMeta"], ["ANY_PATTERN_NODE"]))  # (its metatype)
    assert not nncf_matching._types_present(g, pattern(["conv"], ["sigmoid", "tanh"]))
    assert nncf_matching._types_present(g, pattern(["NON_PATTERN_NODE"], ["relu"]))

    monkeypatch.setattr(graph_matching, "ism", ism)
    nncf_matching.install()
    runs = {"vf2": 0}
    original = ism.MultiDiGraphMatcher.subgraph_isomorphisms_iter

    def counted(self):
        runs["vf2"] += 1
        return original(self)

    monkeypatch.setattr(ism.MultiDiGraphMatcher, "subgraph_isomorphisms_iter", counted)
    nx_graph = InsertionPointGraph(GraphConverter.create_nncf_graph(_model())).get_base_nx_graph()
    patterns = PatternsManager.get_full_hw_pattern_graph(backend=BackendType.ONNX, device=TargetDevice.CPU)
    graph_matching.find_subgraphs_matching_pattern(nx_graph, patterns)
    searched = runs["vf2"]
    total = len(patterns.get_weakly_connected_subgraphs())
    assert 0 < searched < total, (searched, total)


def test_a_pattern_view_is_matched_as_a_graph_of_its_own():
    """`_concrete`: a view (each of NNCF's patterns is one) becomes a MultiDiGraph with the view's nodes in
    the view's order, their attributes and every parallel edge; a graph is left as it is."""
    import networkx as nx

    g = nx.MultiDiGraph()
    for n in ("d", "a", "c", "b", "e", *(f"x{i}" for i in range(20))):  # (a parent over twice the view's size:
        g.add_node(n, type=[n.upper()])  # networkx then iterates the view's own node set, as for NNCF's patterns)
    g.add_edges_from([("a", "c"), ("a", "c"), ("c", "b"), ("d", "a"), ("b", "e")])
    view = g.subgraph(["c", "a", "b"])
    got = nncf_matching._concrete(view)
    assert not nx.is_frozen(got) and isinstance(got, nx.MultiDiGraph)
    assert list(got.nodes) == list(view.nodes) and dict(got.nodes(data=True)) == dict(view.nodes(data=True))
    assert list(got.nodes) == list(view)  # (the order VF2 numbers a pattern's nodes in)
    assert sorted(got.edges(keys=True)) == sorted(view.edges(keys=True)) == [("a", "c", 0), ("a", "c", 1),
                                                                             ("c", "b", 0)]
    assert nncf_matching._concrete(g) is g
