"""The multi-shot driver end to end on a tiny Hugging Face Llama with the real KFAC collection."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surgeon_fx.passes.curvature import collect_kfac
from surgeon_fx.passes.surgeon import SurgeonConfig, prune
from surgeon_fx.groups import Group, Slice, Unit, unit_sizes

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 64, 2


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
                      use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def windows(n=8, length=16):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))


def hand_groups():
    """Per layer: MLP neurons (gate/up row + down column) and heads (8 q/k/v rows + 8 o columns)."""
    groups = []
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        neurons = [Unit((Slice(f"{p}.mlp.gate_proj.weight", 0, torch.tensor([n])),
                         Slice(f"{p}.mlp.up_proj.weight", 0, torch.tensor([n])),
                         Slice(f"{p}.mlp.down_proj.weight", 1, torch.tensor([n])))) for n in range(FFN)]
        heads = []
        for h in range(HEADS):
            idx = torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            heads.append(Unit(tuple(Slice(f"{p}.self_attn.{x}_proj.weight", 0, idx) for x in "qkv")
                              + (Slice(f"{p}.self_attn.o_proj.weight", 1, idx),)))
        groups.append(Group(f"{p}.mlp", "neurons", neurons, min_keep=4))
        groups.append(Group(f"{p}.heads", "heads", heads, min_keep=1))
    return groups


def weights_of(model, result):
    return {n: p for n, p in model.named_parameters() if n in result.masks}


def test_unstructured_meets_targets_and_masks_are_zero():
    model, win = tiny_llama(), windows()
    seen = []
    result = prune(model, win, None, SurgeonConfig(target=0.4, shots=3), progress=seen.append)
    total = sum(m.numel() for m in result.masks.values())
    assert [log.shot for log in seen] == [1, 2, 3]
    for log in result.logs:
        assert abs(log.achieved - log.target) <= 1.0 / total
        assert log.cost >= 0
    for name, p in weights_of(model, result).items():
        assert (p[~result.masks[name]] == 0).all()
    assert set(result.kept) == {n.rpartition(".")[0] for n in result.masks}
    assert "lm_head" not in result.kept


@pytest.mark.parametrize("structure,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_semi_structured_exact_n_per_m(structure, n, m):
    model = tiny_llama()
    result = prune(model, windows(), None, SurgeonConfig(structure=structure, shots=2))
    assert result.logs[-1].target == n / m
    for name, p in weights_of(model, result).items():
        W = p.detach()  # Linear: (out, in); blocks of m consecutive input columns
        assert ((W != 0).reshape(W.shape[0], -1, m).sum(-1) == n).all(), name
        assert (result.masks[name].reshape(W.shape[0], -1, m).sum(-1) == n).all()


def test_sequential_nm_choice_loses_less_of_the_layer_objective():
    # The N:M choice made during the sweep (on compensated weights) against the one made before it: summed
    # over the layers, the second-order loss tr(ΔW A ΔWᵀ) of the dense inputs is lower, and the pattern holds.
    dense, win = tiny_llama(), windows()
    factors = collect_kfac(dense, win, layers=[n for n, m in dense.named_modules()
                                               if isinstance(m, torch.nn.Linear) and n != "lm_head"])
    loss = {}
    for select in ("sequential", "fixed"):
        model = tiny_llama()
        result = prune(model, win, None, SurgeonConfig(structure="2:4", shots=1, nm_select=select))
        weights, before = dict(model.named_parameters()), dict(dense.named_parameters())
        loss[select] = 0.0
        for name in result.masks:
            delta = (weights[name] - before[name]).detach().double()
            loss[select] += float(torch.trace(delta @ factors[name.rpartition(".")[0]].A.double() @ delta.T))
            assert (result.masks[name].reshape(delta.shape[0], -1, 4).sum(-1) == 2).all()
    assert loss["sequential"] < loss["fixed"]


def test_magnitude_is_the_global_magnitude_threshold():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(model, windows(), None, SurgeonConfig(target=0.3, shots=1, curvature="identity"))
    kept = torch.cat([before[n].abs()[m] for n, m in result.masks.items()])
    dropped = torch.cat([before[n].abs()[~m] for n, m in result.masks.items()])
    assert kept.min() >= dropped.max()
    for name, p in weights_of(model, result).items():  # no update: kept weights unchanged
        assert torch.equal(p[result.masks[name]], before[name][result.masks[name]])


@pytest.mark.parametrize("curvature", ["diag_a", "diag_ga"])
@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_obd_baselines_only_zero(curvature, structure):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = hand_groups() if structure == "structured" else None
    result = prune(model, windows(), groups, SurgeonConfig(structure=structure, target=0.7, shots=1,
                                                           curvature=curvature))
    assert result.logs[-1].achieved <= 0.7 + 1e-9
    for name, p in model.named_parameters():
        keep = result.masks.get(name, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(p[keep], before[name][keep]) and (p[~keep] == 0).all()


def test_structured_hand_groups_consistent():
    model, win = tiny_llama(), windows()
    groups = hand_groups()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(model, win, groups, SurgeonConfig(structure="structured", target=0.6, shots=2))
    params = dict(model.named_parameters())
    n_prunable = sum(params[n].numel() for n in result.masks)
    largest_unit = 4 * HEAD_DIM * HIDDEN
    # the kept size closest to the target: within half the largest unit, above or below (issue 14)
    assert abs(result.logs[-1].achieved - 0.6) <= (largest_unit / 2 + 1) / n_prunable
    by_name = {g.name: g for g in groups}
    for gname, removed in result.removed.items():
        g = by_name[gname]
        assert g.size - len(removed) >= g.min_keep
        for u in removed:
            for s in g.units[u].slices:
                assert (params[s.param].index_select(s.dim, s.index) == 0).all()
    assert any(result.removed.values())
    # kept weights moved (correlated update), the removed ones are dead: perturbing their outgoing
    # down_proj columns / o_proj columns leaves the model's output unchanged
    moved = [n for n in result.masks if not torch.equal(params[n][result.masks[n]], before[n][result.masks[n]])]
    assert moved
    with torch.no_grad():
        ref = model(win).logits
        for gname, removed in result.removed.items():
            for u in removed:
                s = by_name[gname].units[u].slices[-1]  # the down_proj / o_proj column block
                params[s.param].index_fill_(s.dim, s.index, 3.0)
        torch.testing.assert_close(model(win).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("target", [0.8, 0.7, 0.6])
def test_overlapping_groups_land_on_target_in_one_shot(target):
    """Grouped-query attention gives overlapping groups: a KV-head unit holds the slices of its query heads, which
    the query-head group holds too, so a selection that takes both counts those slices twice.  Here pairs of
    heads play the KV heads; heads 0 and 1 are nearly free so both groups take them.  One shot must still land
    within half the largest unit of the target (it kept 0.90 for 0.8 and 0.79 for 0.6 when counting twice)."""
    model = tiny_llama()
    with torch.no_grad():
        for block in model.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.weight[: 2 * HEAD_DIM] *= 1e-3
    groups = hand_groups()
    for layer in range(LAYERS):
        heads = next(g for g in groups if g.name == f"model.layers.{layer}.heads")
        pairs = [Unit(heads.units[2 * i].slices + heads.units[2 * i + 1].slices) for i in range(HEADS // 2)]
        groups.append(Group(f"model.layers.{layer}.kv_heads", "kv_heads", pairs))
    result = prune(model, windows(), groups, SurgeonConfig(structure="structured", target=target, shots=1))
    assert any(result.removed[f"model.layers.{layer}.kv_heads"] for layer in range(LAYERS))
    n_prunable = sum(m.numel() for m in result.masks.values())
    largest = max(max(s) for s in unit_sizes(model, groups).values())
    assert abs(result.logs[-1].achieved - target) <= (largest / 2 + 1) / n_prunable


@pytest.mark.parametrize("update", ["consumer", "correlated"])
def test_structured_consumer_update_leaves_producers(update):
    """"consumer" updates only the layers that lose columns (o_proj, down_proj); "correlated" also moves the kept
    rows of the producers (q/k/v, gate/up) — the two compensations of one removed unit that add up."""
    model, win = tiny_llama(), windows()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(model, win, hand_groups(), SurgeonConfig(structure="structured", target=0.7, shots=1,
                                                            update=update))
    params = dict(model.named_parameters())
    touched = {n for n, keep in result.masks.items() if not keep.all()}
    producers = {n for n in touched if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                    "gate_proj.weight", "up_proj.weight"))}
    consumers = touched - producers
    assert producers and consumers

    def moved(n):
        keep = result.masks[n]
        return not torch.equal(params[n][keep], before[n][keep])

    assert all(moved(n) for n in consumers)
    if update == "consumer":
        assert not any(moved(n) for n in producers)
    else:
        assert all(moved(n) for n in producers)


class Interrupt(RuntimeError):
    pass


@pytest.mark.parametrize("structure", ["unstructured", "structured"])
def test_resume_is_bitwise_identical(tmp_path, structure):
    groups = hand_groups() if structure == "structured" else None
    config = SurgeonConfig(structure=structure, target=0.6, shots=3, lora_rank=2, lora_steps=2)
    win = windows()
    ref_model = tiny_llama()
    ref = prune(ref_model, win, groups, config, collect_curvature=collect_kfac)

    calls = []

    def flaky(model, w):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt
        return collect_kfac(model, w)

    with pytest.raises(Interrupt):
        prune(tiny_llama(), win, groups, config, collect_curvature=flaky, checkpoint_dir=tmp_path)
    resumed_model = tiny_llama(seed=5)  # its weights are replaced by the checkpoint's
    res = prune(resumed_model, win, groups, config, collect_curvature=flaky, checkpoint_dir=tmp_path)
    assert len(calls) == 4  # shot 1, the interrupted shot 2, then shots 2 and 3
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert ref.removed == res.removed
    assert all(torch.equal(ref.masks[n], res.masks[n]) for n in ref.masks)
    assert [(l.target, l.achieved, l.cost, l.lora_loss) for l in ref.logs] == \
        [(l.target, l.achieved, l.cost, l.lora_loss) for l in res.logs]


def test_resume_rejects_other_config(tmp_path):
    prune(tiny_llama(), windows(), None, SurgeonConfig(target=0.8, shots=1, curvature="identity"),
          checkpoint_dir=tmp_path)
    with pytest.raises(ValueError):
        prune(tiny_llama(), windows(), None, SurgeonConfig(target=0.7, shots=1, curvature="identity"),
              checkpoint_dir=tmp_path)
