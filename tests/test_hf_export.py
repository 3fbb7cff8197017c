"""hf/ folders for structured results whose layers keep different widths: every Hugging Face family the
structured pruning supports loads with `from_pretrained(..., trust_remote_code=True)`, reproduces the pruned
model's logits and generates the same tokens."""
from __future__ import annotations

import json

import pytest
import torch

from surgeon_fx import emit, hf_export
from surgeon_fx.graph import build_graph
from surgeon_fx.hf import tiny_gpt2, tiny_llama, tiny_opt, tiny_qwen2
from surgeon_fx.passes.rewrite import shrink
from tests.archs import tiny_gemma

FAMILIES = {"llama": tiny_llama, "llama-mha": lambda: tiny_llama(gqa=False), "qwen2": tiny_qwen2, "opt": tiny_opt,
            "gpt2": tiny_gpt2, "gemma": tiny_gemma}


def pruned_unevenly(build):
    """(pruned model, its dense config dict, token ids): layer i loses i + 1 units of every exact group
    (as many as its min_keep allows), so no two layers keep the same widths."""
    model = build()
    dense = model.config.to_dict()
    ids = (torch.arange(10)[None] * 7) % model.config.vocab_size
    graph = build_graph(model, (ids,))
    removed, depth = {}, {}
    for g in (g for g in graph.groups if g.exact):
        i = depth[g.kind] = depth.get(g.kind, -1) + 1
        removed[g.name] = list(range(min(i + 1, g.size - max(1, g.min_keep))))
    shrink(model, graph, removed)
    return model, dense, ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_uneven_widths_load_with_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, dense, ids = pruned_unevenly(FAMILIES[family])
    assert emit._config_mismatch(model) is not None  # the family's own config cannot describe it
    assert emit.save_hf(model, None, tmp_path / "hf", ids, dense) is None
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    widths = config["layer_widths"]
    assert len(widths) == model.config.num_hidden_layers
    assert len({w["intermediate_size"] for w in widths}) == len(widths)  # every layer its own MLP width
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_surgeon.SurgeonForCausalLM"
    assert (tmp_path / "hf" / hf_export.MODELING_FILE).is_file()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :4]
    settings = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **settings), model.generate(prompt, **settings))


def test_uniform_widths_keep_the_plain_folder(tmp_path):
    model = tiny_llama()
    ids = torch.arange(12)[None]
    graph = build_graph(model, (ids,))
    shrink(model, graph, {g.name: [0, 5, 7] for g in graph.groups if g.kind == "neurons"})
    assert emit.save_hf(model, None, tmp_path / "hf", ids, tiny_llama().config.to_dict()) is None
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "layer_widths" not in config
    assert not (tmp_path / "hf" / hf_export.MODELING_FILE).exists()


def test_tokenizer_is_copied_into_the_per_layer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    model, dense, ids = pruned_unevenly(tiny_llama)
    assert emit.save_hf(model, tokenizer, tmp_path / "hf", ids, dense) is None
    again = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert again("the cat sat on the mat")["input_ids"] == [1, 2, 3, 4, 1, 5]


def test_modeling_file_names_the_family_classes():
    source = hf_export.modeling_source("GPT2Config", "GPT2LMHeadModel")
    assert "from transformers import GPT2Config as BaseConfig, GPT2LMHeadModel as BaseForCausalLM" in source
    assert "LlamaConfig" not in source.split('"""', 2)[2]  # only the docstring may mention Llama
    compile(source, hf_export.MODELING_FILE, "exec")


def test_an_unknown_family_is_refused_with_the_reason(tmp_path):
    model, dense, ids = pruned_unevenly(tiny_llama)
    model.config.model_type = "not-a-family"
    reason = emit.save_hf(model, None, tmp_path / "hf", ids, dense)
    assert "layer widths differ" in reason and not (tmp_path / "hf").exists()
