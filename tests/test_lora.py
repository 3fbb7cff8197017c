"""Masked low-rank corrections: adapters are really installed, trained, absorbed only where kept, removed."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surgeon_fx.passes.lora import lm_loss, lora_correct


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def test_lora_lowers_loss_and_respects_masks():
    model = tiny_llama()
    win = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    masks = {f"{n}.weight": torch.rand(params[f"{n}.weight"].shape, generator=gen) < 0.5 for n in layers}
    with torch.no_grad():
        for n, keep in masks.items():
            params[n].mul_(keep)
        before = {n: p.clone() for n, p in params.items()}
        loss0 = float(lm_loss(model, win))
    flags = {n: p.requires_grad for n, p in params.items()}
    losses = lora_correct(model, win, layers, masks, rank=4, steps=30, lr=1e-2, batch_size=4)
    with torch.no_grad():
        loss1 = float(lm_loss(model, win))
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert loss1 < loss0 - 1e-3  # the absorbed correction keeps the gain
    for n, keep in masks.items():
        assert (params[n][~keep] == 0).all()  # pruned weights stay exactly zero
        assert not torch.equal(params[n][keep], before[n][keep])  # kept weights changed
    for n, p in params.items():
        if n not in masks:
            assert torch.equal(p, before[n])
        assert p.requires_grad == flags[n]
    for m in model.modules():
        assert not m._forward_hooks  # adapters removed
