"""surgeon-fx: a graph-based pruning compiler for PyTorch (The LLM Surgeon, on arbitrary models).

Pipeline: trace → graph → curvature → costs → threshold → update → rewrite → emit.

Importing the package loads the core only (groups, trace, graph); `surgeon_fx.load` imports the pipeline's
loader on first use, so that a pass importing the core does not pull in the pipeline (docs/design.md, "Layers").
"""
from .graph import DependencyGraph, build_graph
from .groups import Group, Slice, Unit
from .trace import TraceError, trace

__all__ = ["DependencyGraph", "Group", "Slice", "TraceError", "Unit", "build_graph", "load", "trace"]


def __getattr__(name: str):
    if name == "load":
        from .loader import load

        return load
    raise AttributeError(f"module 'surgeon_fx' has no attribute {name!r}")
