"""surgeon-fx: a graph-based pruning compiler for PyTorch (The LLM Surgeon, on arbitrary models).

Pipeline: trace → graph → curvature → costs → threshold → update → rewrite → emit.
"""
from .graph import DependencyGraph, build_graph
from .groups import Group, Slice, Unit
from .trace import TraceError, trace
from .load import load

__all__ = ["DependencyGraph", "Group", "Slice", "TraceError", "Unit", "build_graph", "load", "trace"]
