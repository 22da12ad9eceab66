"""NNCF's pattern matching with node types compared first: the same matches, sooner.

Why: NNCF finds its fused patterns (Conv+BN+Relu and the like, several hundred per backend) by running
networkx's VF2 matcher (`MultiDiGraphMatcher.subgraph_isomorphisms_iter`) over the whole model graph for
each pattern, in `nncf.common.graph.graph_matching.find_subgraphs_matching_pattern`. VF2 tests a candidate
pair of nodes with `syntactic_feasibility` (counting the edges between each node and the mapping so far,
in Python, over networkx's adjacency views) before `semantic_feasibility` (NNCF's node-type test), and on
a real model almost every pair fails the type test. On PP-OCR's recogniser the matching took 2.0-2.4 s of
NNCF's 4.5-5.4 s inside an export (78,000 syntactic tests).

`SemanticFirstMatcher` runs the node-type test first. Both tests are side-effect free and a pair is taken
only when both pass, so the pairs accepted, their order and so every match and the order NNCF sees them
in are unchanged: NNCF's quantized graph is byte-identical (tests/unit/test_nncf_matching.py, real NNCF).
Before VF2 starts on a pattern, `SemanticFirstMatcher` also checks that each of the pattern's nodes names
a node type the graph has at all (the one test of NNCF's node match every graph node must pass for that
pattern node: its type, or its metatype, in the pattern node's list). A pattern with a type the graph lacks
matches nothing, so VF2 is not run for it: on PP-OCR's recogniser 64 of 145 patterns, 0.5 s of NNCF's
fused-pattern matching (1.5 s). The matches are the same: VF2 would have found none for it.

The matcher also gets each pattern as a graph of its own rather than NNCF's view of it (`_concrete`): VF2
reads the pattern's edges in every test, and through the view each read filters the adjacency of all the
fused patterns together; on the recogniser the matching took 0.55 instead of 1.0 s, the graph byte-identical.

NNCF gives no hook for its matcher, so the module's `ism` (networkx.algorithms.isomorphism, used there
for this class only) is replaced once per process by a view of it with this class in place (`install`).
"""
from __future__ import annotations

import threading
from types import ModuleType

_installed = threading.Lock()


def _matcher_class():
    import networkx.algorithms.isomorphism as ism

    class SemanticFirstMatcher(ism.MultiDiGraphMatcher):
        """networkx's MultiDiGraphMatcher, node_match tested before the edge counts (then again by
        semantic_feasibility, with the edge_match: a cheap repeat on the few pairs that get there), on a
        pattern made a graph of its own (`_concrete`)."""

        def __init__(self, G1, G2, node_match=None, edge_match=None):  # noqa: N803 (networkx's names)
            super().__init__(G1, _concrete(G2), node_match, edge_match)

        def subgraph_isomorphisms_iter(self):
            if self.node_match is _nncf_node_match() and not _types_present(self.G1, self.G2):
                return iter(())  # (VF2 would find no match: a pattern node's types are not in the graph)
            return super().subgraph_isomorphisms_iter()

        def syntactic_feasibility(self, G1_node, G2_node):  # noqa: N803 (networkx's names)
            if self.node_match is not None and not self.node_match(self.G1.nodes[G1_node], self.G2.nodes[G2_node]):
                return False
            return super().syntactic_feasibility(G1_node, G2_node)

    return SemanticFirstMatcher


def _concrete(graph):
    """`graph` itself, or where it is a view (networkx's subgraph views: each pattern NNCF matches is one,
    `GraphPattern.get_weakly_connected_subgraphs`), a MultiDiGraph of the same nodes, attributes and edges,
    its nodes in the view's order. Why: VF2 reads the pattern's adjacency in every edge-count test, and
    through a view each read filters the whole pattern graph's adjacency (all of NNCF's fused patterns:
    hundreds of nodes) down to the few nodes of one pattern; on PP-OCR's recogniser those reads were
    about half of NNCF's fused-pattern matching. The same matches in the same order: VF2 orders a
    pattern's nodes by their iteration order, the same here, and counts its edges, the same edges."""
    import networkx as nx

    if not nx.is_frozen(graph) or not graph.is_multigraph() or not graph.is_directed():
        return graph
    out = nx.MultiDiGraph()
    out.add_nodes_from(graph.nodes(data=True))
    out.add_edges_from(graph.edges(keys=True, data=True))
    return out


# NNCF's node attributes (nncf.common.graph.patterns.GraphPattern): a pattern node's list of types under
# "type", a graph node's type under "type" and its metatype under "metatype"; a pattern node of these
# kinds matches any graph node
_TYPES, _METATYPE, _ANY = "type", "metatype", ("ANY_PATTERN_NODE", "NON_PATTERN_NODE")


def _nncf_node_match():
    """NNCF's node match, the one `_types_present` reads the rule of (None where this NNCF has none)."""
    try:
        from nncf.common.graph import graph_matching
    except ImportError:
        return None
    return getattr(graph_matching, "_are_nodes_matched", None)


def _types_present(graph, pattern) -> bool:
    """Whether every node of `pattern` names a type or metatype some node of `graph` has: what NNCF's node
    match (`graph_matching._are_nodes_matched`) asks of a graph node before anything else. False means no
    graph node can match one of the pattern's nodes, so the pattern matches nothing. True when it cannot
    tell (a pattern node without a type list, an unhashable type): then VF2 decides, as before."""
    try:
        present = {d.get(_TYPES) for _, d in graph.nodes(data=True)}
        present |= {d[_METATYPE] for _, d in graph.nodes(data=True) if _METATYPE in d}
        for _, node in pattern.nodes(data=True):
            allowed = node.get(_TYPES)
            if not isinstance(allowed, (list, tuple, set, frozenset)) or any(a in allowed for a in _ANY):
                continue
            if not any(a in present for a in allowed):
                return False
    except TypeError:  # (a type that cannot be hashed: no shortcut)
        return True
    return True


class _IsomorphismView(ModuleType):
    """networkx.algorithms.isomorphism with MultiDiGraphMatcher swapped: every other name is networkx's."""

    def __init__(self, module: ModuleType, matcher: type):
        super().__init__(module.__name__)
        self._module, self.MultiDiGraphMatcher = module, matcher

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def install() -> bool:
    """Have NNCF's graph matching use SemanticFirstMatcher, once per process (idempotent, thread-safe).
    False when this NNCF has no such module or does not use networkx's matcher there (left as it is)."""
    try:
        from nncf.common.graph import graph_matching
    except ImportError:
        return False
    with _installed:
        current = getattr(graph_matching, "ism", None)
        if isinstance(current, _IsomorphismView):
            return True
        if not isinstance(current, ModuleType) or not hasattr(current, "MultiDiGraphMatcher"):
            return False
        graph_matching.ism = _IsomorphismView(current, _matcher_class())
        return True
