"""Tracing: capture a model as an ATen-level `torch.fx` graph whose names refer to the user's model.

`torch.export.export(..., strict=False)` is the primary tracer (it runs the Python code as-is, so it handles
Hugging Face models); `torch.fx.symbolic_trace` is the fallback for simple modules that export cannot run.
Hugging Face causal LMs are wrapped so that the traced function returns logits with `use_cache=False`.
Both tracers run quietly (`_quiet`): a failure is the one-line `TraceError`, not torch's graph dumps and logs.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

WRAP = "inner"  # attribute under which a wrapped model sits; stripped from every name


class TraceError(RuntimeError):
    """The model could not be traced by either tracer."""


class LogitsOf(nn.Module):
    """Wraps a Hugging Face causal LM: `forward(input_ids) -> logits` with the KV cache disabled."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, WRAP, model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, WRAP)(input_ids=input_ids, use_cache=False).logits


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face `PreTrainedModel` (any task): rebuilt from its config and class, saved with
    `save_pretrained`."""
    return hasattr(model, "config") and callable(getattr(model, "save_pretrained", None)) and callable(
        getattr(type(model), "_from_config", None))


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model: `model(input_ids=...)` returns next-token `.logits`.

    Its class is one `AutoModelForCausalLM` maps to (or named `*ForCausalLM`); output embeddings alone do not
    make one (every `PreTrainedModel` has `get_output_embeddings`, and `BertForMaskedLM` returns a head)."""
    if not is_hf_model(model):
        return False
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return name.endswith("ForCausalLM")
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    return name in causal or name.endswith("ForCausalLM")


@dataclass
class Traced:
    """An ATen graph plus the maps from its placeholders to the model's parameters and buffers.

    `params` / `buffers` map placeholder node names to qualified names in the user's model.
    `module_of[node_name]` is the innermost module path (user's names) that produced the node.
    """

    graph: torch.fx.Graph
    params: dict[str, str]
    buffers: dict[str, str]
    user_inputs: list[str]
    module_of: dict[str, str] = field(default_factory=dict)
    module_type_of: dict[str, str] = field(default_factory=dict)
    tracer: str = "export"


def _strip(name: str, prefix: str) -> str:
    if not prefix:
        return name
    if name == prefix.rstrip("."):
        return ""
    return name[len(prefix):] if name.startswith(prefix) else name


def _module_maps(graph: torch.fx.Graph, prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    module_of, type_of = {}, {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        path, typ = list(stack.values())[-1]
        module_of[node.name] = _strip(path, prefix)
        type_of[node.name] = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return module_of, type_of


def trace(model: nn.Module, example_inputs: tuple, *, wrap_hf: bool = True) -> Traced:
    """Trace `model(*example_inputs)` to an ATen graph; names in the result are `model`'s own names.

    A Hugging Face causal LM is wrapped with `LogitsOf`; export runs on the model's device and does not
    change its weights.
    """
    wrapped = wrap_hf and is_hf_causal_lm(model)
    root = LogitsOf(model) if wrapped else model
    prefix = WRAP + "." if wrapped else ""
    try:
        with torch.no_grad(), _quiet():
            ep = torch.export.export(root, tuple(example_inputs), strict=False)
    except Exception as export_error:  # noqa: BLE001 - fall back, then report both
        try:
            with _quiet():
                gm = torch.fx.symbolic_trace(root)
        except Exception as fx_error:  # noqa: BLE001
            raise TraceError(
                f"cannot trace {type(model).__name__}: torch.export failed with "
                f"{type(export_error).__name__}: {str(export_error).splitlines()[0] if str(export_error) else ''}; "
                f"torch.fx.symbolic_trace failed with {type(fx_error).__name__}: {fx_error}"
            ) from export_error
        return _from_symbolic(gm, example_inputs)
    sig = ep.graph_signature
    params = {k: _strip(v, prefix) for k, v in sig.inputs_to_parameters.items()}
    buffers = {k: _strip(v, prefix) for k, v in sig.inputs_to_buffers.items()}
    module_of, type_of = _module_maps(ep.graph, prefix)
    return Traced(ep.graph, params, buffers, list(sig.user_inputs), module_of, type_of, "export")


@contextlib.contextmanager
def _quiet():
    """Silence what torch's tracers write to stderr while they try (graph dumps, symbolic-shape warnings)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _from_symbolic(gm: torch.fx.GraphModule, example_inputs: tuple) -> Traced:
    """Lower a symbolic trace to ATen with `make_fx`, so that the same op rules apply."""
    from torch.fx.experimental.proxy_tensor import make_fx

    names = dict(gm.named_parameters(remove_duplicate=False))
    bufs = dict(gm.named_buffers(remove_duplicate=False))
    flat = {**names, **bufs}

    def fn(state, *inputs):
        return torch.func.functional_call(gm, state, inputs)

    with torch.no_grad():
        lowered = make_fx(fn, tracing_mode="fake")(flat, *example_inputs)
    placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
    keys = list(flat)
    params = {p.name: k for p, k in zip(placeholders, keys) if k in names}
    buffers = {p.name: k for p, k in zip(placeholders, keys) if k in bufs}
    user = [p.name for p in placeholders[len(keys):]]
    return Traced(lowered.graph, params, buffers, user, {}, {}, "symbolic_trace")
