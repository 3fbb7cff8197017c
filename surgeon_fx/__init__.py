"""surgeon-fx: a graph-based pruning compiler for PyTorch (The LLM Surgeon, on arbitrary models).

Pipeline: trace → graph → curvature → costs → threshold → update → rewrite → emit.

Importing the package imports nothing (not even torch): each name below is imported on first use from its
module — the core (groups, trace, graph) or, for `surgeon_fx.load`, the pipeline's loader — so that a pass
importing the core does not pull in the pipeline (docs/design.md, "Layers") and `surgeon-compile` can answer
Ctrl-C during start-up with one line.  `surgeon_fx.trace` is the tracing module (its function is
`surgeon_fx.trace.trace`): a lazily exported function of the same name would be replaced by the module as soon
as the module is imported.
"""
from importlib import import_module

_HOMES = {"DependencyGraph": "graph", "build_graph": "graph", "Group": "groups", "Slice": "groups", "Unit": "groups",
          "TraceError": "trace", "load": "loader"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'surgeon_fx' has no attribute {name!r}")
