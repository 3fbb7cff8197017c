"""The coverage zoo: 30+ real-world architectures as tiny random-weight models, built offline.

Each `Arch` builds a model (torchvision classes with small dimensions, Hugging Face models from tiny configs)
and its example inputs; `expect` lists the group kinds the dependency graph must find.  `tests/test_coverage.py`
checks every one (trace → groups → shrink == mask), `bench/coverage.py` also compiles and reloads them and
writes the table `docs/results/coverage.md`.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

TEXT = (2, 7)  # batch × tokens of the example token ids
IMAGE = 32  # side of the example images of the CNNs


@dataclass(frozen=True)
class Arch:
    """One zoo entry: `build()` → (model in eval mode, example inputs tuple)."""

    name: str
    family: str
    build: Callable[[], tuple[nn.Module, tuple]]
    expect: frozenset[str] = field(default_factory=frozenset)  # group kinds that must be found
    slow: bool = False  # outside the default test run (see FAST)


def import_torchvision():
    """`torchvision`, also where its C++ ops cannot load: the PyPI wheel is built against CUDA torch, and on a
    CPU-only torch its `_meta_registrations` registers fakes for `torchvision::nms` / `qnms`, which then do not
    exist, so the import fails (and with it every `transformers` model, which imports torchvision when it is
    installed).  Declaring those two schemas lets the pure-Python models import; no detection op is used here.
    Call it before anything imports `transformers` (tests/conftest.py does)."""
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        _LIBRARIES.append(lib)  # a Library's definitions live as long as the object
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


_LIBRARIES: list = []


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


if has_torchvision():  # before anything imports transformers
    import_torchvision()


def _ids(vocab: int, shape=TEXT) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _image(side: int = IMAGE, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(2))


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and norm affines, so masked channels are not trivially zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for p in model.parameters():  # zero-initialised layers (torchvision ViT's head) would hide any difference
            if p.dim() >= 2 and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


# -- torchvision ------------------------------------------------------------------------------------------
def _tv(factory: Callable[[object], nn.Module], side: int = IMAGE) -> Callable[[], tuple[nn.Module, tuple]]:
    def build():
        torch.manual_seed(0)
        model = factory(import_torchvision().models)
        return _randomize_norms(model), (_image(side),)

    return build


def _vit(models):
    return models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                    mlp_dim=48, num_classes=10)


def _swin(models):
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[2, 2],
                           num_classes=10)


def _densenet(models):
    return models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)


TORCHVISION = [
    Arch("resnet18", "torchvision", _tv(lambda m: m.resnet18(num_classes=10)), frozenset({"channels"})),
    Arch("resnet50", "torchvision", _tv(lambda m: m.resnet50(num_classes=10)), frozenset({"channels"})),
    Arch("mobilenet_v3_small", "torchvision", _tv(lambda m: m.mobilenet_v3_small(num_classes=10)),
         frozenset({"channels", "neurons"})),
    Arch("mobilenet_v2", "torchvision", _tv(lambda m: m.mobilenet_v2(num_classes=10)), frozenset({"channels"})),
    Arch("efficientnet_b0", "torchvision", _tv(lambda m: m.efficientnet_b0(num_classes=10)), frozenset({"channels"})),
    Arch("convnext_tiny", "torchvision", _tv(lambda m: m.convnext_tiny(num_classes=10)), frozenset({"neurons"})),
    Arch("regnet_y_400mf", "torchvision", _tv(lambda m: m.regnet_y_400mf(num_classes=10)), frozenset({"channels"})),
    Arch("vit_b_16 (tiny dims)", "torchvision", _tv(_vit, 16), frozenset({"neurons", "channels"})),
    Arch("swin_t (tiny dims)", "torchvision", _tv(_swin, 16), frozenset({"neurons"})),
    Arch("densenet (tiny dims)", "torchvision", _tv(_densenet), frozenset({"channels"})),
    Arch("shufflenet_v2_x0_5", "torchvision", _tv(lambda m: m.shufflenet_v2_x0_5(num_classes=10)),
         frozenset({"channels"})),
    Arch("squeezenet1_1", "torchvision", _tv(lambda m: m.squeezenet1_1(num_classes=10)), frozenset({"channels"})),
]


# -- Hugging Face -----------------------------------------------------------------------------------------
def _hf(config_name: str, model_name: str, inputs: Callable[[object], tuple] | None = None, **kw):
    def build():
        import transformers

        config = getattr(transformers, config_name)(**kw)
        if hasattr(config, "use_cache"):
            config.use_cache = False
        torch.manual_seed(0)
        cls = getattr(transformers, model_name)
        try:
            model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        except ValueError:  # no SDPA implementation for this architecture
            model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
        model = _randomize_norms(model)
        vocab = getattr(config, "vocab_size", 128)
        return model, (inputs(config) if inputs else (_ids(vocab),))

    return build


LM = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64)
GQA = dict(LM, num_key_value_heads=2)
ATTN = frozenset({"heads", "neurons", "residual"})
KV = ATTN | {"kv_heads"}


def _t5_inputs(config):
    return _ids(config.vocab_size), None, _ids(config.vocab_size, (2, 5))


def _wav2vec2_inputs(config):
    return (torch.randn(2, 400, generator=torch.Generator().manual_seed(3)),)


def _clip_inputs(config):
    return (_image(config.image_size),)


HUGGING_FACE = [
    Arch("llama", "hf causal LM", _hf("LlamaConfig", "LlamaForCausalLM", **GQA), KV),
    Arch("mistral", "hf causal LM", _hf("MistralConfig", "MistralForCausalLM", sliding_window=4, **GQA), KV),
    Arch("qwen2", "hf causal LM", _hf("Qwen2Config", "Qwen2ForCausalLM", **GQA), KV),
    Arch("qwen3 (q/k norms)", "hf causal LM", _hf("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **GQA), KV),
    Arch("gemma", "hf causal LM", _hf("GemmaConfig", "GemmaForCausalLM", head_dim=8, **GQA), KV),
    Arch("gemma2", "hf causal LM", _hf("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4, **GQA), KV),
    Arch("gemma3 (q/k norms)", "hf causal LM", _hf("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8,
                                                    sliding_window=4, **GQA), KV),
    Arch("phi", "hf causal LM", _hf("PhiConfig", "PhiForCausalLM", **LM), ATTN),
    Arch("phi3 (fused qkv, gate_up)", "hf causal LM", _hf("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **GQA), KV),
    Arch("gpt2", "hf causal LM", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64), ATTN),
    Arch("gptj", "hf causal LM", _hf("GPTJConfig", "GPTJForCausalLM", vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                     rotary_dim=4, n_positions=64), ATTN),
    Arch("gpt_neox", "hf causal LM", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **LM), ATTN),
    Arch("opt", "hf causal LM", _hf("OPTConfig", "OPTForCausalLM", vocab_size=128, hidden_size=32, ffn_dim=48,
                                    num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                                    max_position_embeddings=64), ATTN),
    Arch("bloom (alibi, fused qkv)", "hf causal LM", _hf("BloomConfig", "BloomForCausalLM", vocab_size=128,
                                                         hidden_size=32, n_layer=2, n_head=4),
         frozenset({"neurons", "residual"})),
    Arch("falcon (new decoder, GQA)", "hf causal LM", _hf(
        "FalconConfig", "FalconForCausalLM", vocab_size=128, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True, bias=False), KV),
    Arch("falcon (multi-query, parallel)", "hf causal LM", _hf(
        "FalconConfig", "FalconForCausalLM", vocab_size=128, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False),
        ATTN),
    # experts as one batched matmul over the routed weights: the default grouped_mm is float32-only and the
    # eager loop over hit experts cannot be exported (its trip count depends on the data)
    Arch("mixtral (MoE)", "hf causal LM", _hf("MixtralConfig", "MixtralForCausalLM", num_local_experts=4,
                                              num_experts_per_tok=2, experts_implementation="batched_mm", **GQA),
         KV),
    Arch("qwen2_moe (MoE + shared expert)", "hf causal LM", _hf(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, experts_implementation="batched_mm", **GQA), KV),
    Arch("bert (masked LM)", "hf encoder", _hf("BertConfig", "BertForMaskedLM", **LM), ATTN),
    Arch("roberta (masked LM)", "hf encoder", _hf("RobertaConfig", "RobertaForMaskedLM", pad_token_id=1, **LM), ATTN),
    Arch("distilbert (masked LM)", "hf encoder", _hf("DistilBertConfig", "DistilBertForMaskedLM", vocab_size=128,
                                                     dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                                                     max_position_embeddings=64), ATTN),
    Arch("t5 (encoder-decoder)", "hf seq2seq", _hf("T5Config", "T5ForConditionalGeneration", _t5_inputs,
                                                   vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0),
         frozenset({"heads", "neurons"})),  # no residual group: the encoder's last hidden state is an output
    Arch("wav2vec2 (speech encoder)", "hf speech", _hf(
        "Wav2Vec2Config", "Wav2Vec2Model", _wav2vec2_inputs, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), frozenset({"heads", "neurons"})),
    Arch("clip vision (ViT)", "hf vision", _hf(
        "CLIPVisionConfig", "CLIPVisionModel", _clip_inputs, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8), frozenset({"heads", "neurons"})),
]

# The default test run: one architecture per pattern (CNN with adaptive pooling, dense concatenation, ViT and
# Swin with fixed-width attention, fused QKV GQA written as x @ w.T, fused qkv + gate_up, per-head q/k norms,
# a masked LM, a mixture of experts); the rest run with `-m slow` and in bench/coverage.py.
FAST = {"resnet18", "densenet (tiny dims)", "vit_b_16 (tiny dims)", "swin_t (tiny dims)", "falcon (new decoder, GQA)",
        "phi3 (fused qkv, gate_up)", "qwen3 (q/k norms)", "bert (masked LM)", "mixtral (MoE)"}
ARCHS: dict[str, Arch] = {a.name: replace(a, slow=a.name not in FAST) for a in HUGGING_FACE + TORCHVISION}


# -- checks -----------------------------------------------------------------------------------------------
def main_output(out) -> torch.Tensor:
    """logits, else the first tensor of a model output."""
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out if isinstance(out, torch.Tensor) else out[0]


def shrink_vs_mask(model: nn.Module, inputs: tuple, graph, removed: dict[str, list[int]]) -> float:
    """max |shrunk − masked| / max |masked| of the main output, both run in float64."""
    import copy

    from surgeon_fx.passes.rewrite import mask, shrink

    masked, shrunk = copy.deepcopy(model), copy.deepcopy(model)
    mask(masked, graph, removed)
    shrink(shrunk, graph, removed)
    x64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        a, b = main_output(masked.double()(*x64)), main_output(shrunk.double()(*x64))
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def spread_removal(graph) -> dict[str, list[int]]:
    """Every exact group loses units, a third or two thirds of them by turns (at least one), spread over the
    range: layers end with different widths and head counts, and first, middle and last positions go."""
    out = {}
    for i, g in enumerate(graph.groups):
        k = min(max(1, g.size * (1 + i % 2) // 3), g.size - g.min_keep)
        if g.exact and k > 0:
            out[g.name] = sorted({round(i * (g.size - 1) / max(1, k - 1)) for i in range(k)} if k > 1 else {g.size // 2})
    return out


def unprunable(graph, model: nn.Module) -> list[str]:
    """One line per distinct reason why a weight's output dimension (features, channels, heads) has no group:
    the op named by `graph.explain`, with how many weights it stops."""
    grouped = {(s.param, s.dim) for g in graph.groups for s in g.units[0].slices}
    reasons: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2 or name not in graph.param_shapes:
            continue
        line = graph.explain(name, 0)
        if (name, 0) in grouped:
            continue
        why = line.split(": ", 1)[1] if ": " in line else line
        reasons[_without_node(why)] = reasons.get(_without_node(why), 0) + 1
    return [f"{r} ({n} weight{'s' if n > 1 else ''})" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]


def _without_node(text: str) -> str:
    """'x (linear_3: aten.linear.default)' -> 'x (aten.linear.default)': the op, not the node's name."""
    import re

    return re.sub(r"\(([\w.]+): ", "(", text)


def check_graph(arch: Arch) -> dict:
    """Build, trace, group and compare shrunk with masked: one row of the coverage table (without reload)."""
    import time

    from surgeon_fx.graph import build_graph

    start = time.perf_counter()
    model, inputs = arch.build()
    row: dict = {"architecture": arch.name, "family": arch.family,
                 "parameters": sum(p.numel() for p in model.parameters())}
    graph = build_graph(model, inputs)
    row["tracer"] = graph.traced.tracer
    kinds: dict[str, list[int]] = {}
    for g in graph.groups:
        kinds.setdefault(g.kind + ("" if g.exact else " (inexact)"), []).append(g.size)
    row["groups"] = {k: len(v) for k, v in sorted(kinds.items())}
    removed = spread_removal(graph)
    row["removed_units"] = sum(len(v) for v in removed.values())
    row["shrink_vs_mask"] = shrink_vs_mask(model, inputs, graph, removed) if removed else None
    row["unprunable"] = unprunable(graph, model)
    row["seconds_graph"] = time.perf_counter() - start
    return row
