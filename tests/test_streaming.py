"""Streaming structured shot: one layer's float64 workspace at a time, results equal to pricing all layers at once;
factors kept off the device (CPU or files) and collected in chunks of bounded size."""
import weakref

import torch

import surgeon_fx.passes.surgeon as surgeon
from surgeon_fx.graph import build_graph
from surgeon_fx.passes.baselines import layer_curvature
from surgeon_fx.passes.blocks import read_matrix, to_matrix, unit_blocks, write_matrix
from surgeon_fx.passes.costs import unit_costs
from surgeon_fx.passes.curvature import collect_kfac
from surgeon_fx.passes.factor_store import FactorStore
from surgeon_fx.passes.surgeon import SurgeonConfig, _removed_blocks, prune, pruned_layers
from surgeon_fx.passes.threshold import select_units
from surgeon_fx.passes.update import remove_rows_cols
from surgeon_fx.groups import Unit
from tests.test_surgeon import tiny_llama, windows

CONFIG = SurgeonConfig(structure="structured", target=0.7, shots=1)


def graph_groups(model):
    """The traced groups of the tiny Llama: heads, MLP neurons and the residual stream (which touches every layer)."""
    return build_graph(model, (torch.randint(0, 64, (1, 8)),)).groups


def all_at_once(model, win, groups, config):
    """The shot as it was before streaming: every layer's damped curvature and float64 matrix alive together."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    layers = pruned_layers(model, groups)
    factors = collect_kfac(model, win, layers=layers)
    mats = {}
    for name in layers:
        M = read_matrix(modules[name])
        mats[name] = (M, layer_curvature(config.curvature, M.shape[0], M.shape[1], factors[name], config.damp_a,
                                         config.g_damping(), name))
    blocks = {g.name: [unit_blocks(u, modules, set(layers)) for u in g.units] for g in groups}
    shapes = {n: p.shape for n, p in params.items()}
    sizes = {g.name: [Unit(tuple(s for s in u.slices if s.param in params)).numel(shapes) for u in g.units]
             for g in groups}
    masks = {p: torch.ones_like(params[p], dtype=torch.bool) for g in groups for p in g.params() if p in params}
    n_prunable = sum(m.numel() for m in masks.values())
    scores = {g.name: unit_costs(blocks[g.name], mats) / torch.tensor(sizes[g.name], dtype=torch.float64).clamp_min(1)
              for g in groups}
    new = select_units(scores, sizes, {g.name: set() for g in groups}, n_prunable - round(config.target * n_prunable),
                       {g.name: g.min_keep for g in groups}, {g.name: 1 for g in groups})
    removed = {g: list(v) for g, v in new.items()}
    for name in layers:
        rows, cols = _removed_blocks(name, groups, blocks, removed)
        if rows.numel() or cols.numel():
            producers = _removed_blocks(name, groups, blocks, removed, producers_only=True)[0]
            M, c = mats[name]
            M = remove_rows_cols(M, c.G_inv, c.A_inv, producers, cols)
            M[rows] = 0
            write_matrix(modules[name], M)
    for g in groups:
        for u in removed[g.name]:
            for s in g.units[u].slices:
                if s.param in params:
                    params[s.param].data.index_fill_(s.dim, s.index, 0.0)
    return {g: sorted(v) for g, v in removed.items()}


def count_live_workspaces(monkeypatch) -> list[int]:
    """Patch the driver's `layer_curvature` to record the largest number of layer curvatures alive at once."""
    live, peak = [0], [0]

    def tracked(*args, **kwargs):
        c = layer_curvature(*args, **kwargs)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(c, lambda: live.__setitem__(0, live[0] - 1))
        return c

    monkeypatch.setattr(surgeon, "layer_curvature", tracked)
    return peak


def test_streamed_shot_equals_all_at_once_with_one_workspace_alive(monkeypatch, tmp_path):
    win = windows()
    ref_model = tiny_llama()
    groups = graph_groups(ref_model)
    assert any(len({s.param for u in g.units for s in u.slices}) > 8 for g in groups)  # the residual group spans layers
    ref_removed = all_at_once(ref_model, win, groups, CONFIG)

    peak = count_live_workspaces(monkeypatch)
    model = tiny_llama()
    layers = pruned_layers(model, groups)
    store_dir = tmp_path / "factors"
    result = prune(model, win, groups, CONFIG,
                   collect_curvature=lambda m, w: collect_kfac(m, w, layers=layers, store=FactorStore(store_dir),
                                                               max_factor_bytes=20_000))
    assert peak[0] == 1 < len(layers)
    assert len(list(store_dir.glob("*.pt"))) == len(layers)
    assert result.removed == ref_removed and any(ref_removed.values())
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_chunked_collection_and_store_give_the_same_factors(tmp_path):
    model, win = tiny_llama(), windows(4, 12)
    whole = collect_kfac(model, win)
    sizes = {n: f.A.numel() + f.G.numel() for n, f in whole.items()}
    bound = 4 * max(sizes.values())  # float32: a chunk holds at most a few layers
    chunked = collect_kfac(model, win, max_factor_bytes=bound, store=FactorStore())
    on_disk = collect_kfac(model, win, store=FactorStore(tmp_path))
    assert list(chunked) == list(whole) == list(on_disk)
    for name, f in whole.items():
        for other in (chunked[name], on_disk[name]):
            assert torch.equal(f.A, other.A) and torch.equal(f.G, other.G) and f.tokens == other.tokens
            assert other.A.device.type == "cpu"
        assert torch.equal(f.A, f.A.T) and torch.equal(f.G, f.G.T)  # exactly symmetric: the store packs them


def test_chunks_respect_the_bound():
    from surgeon_fx.passes.curvature import _chunks

    model = tiny_llama()
    modules = dict(model.named_modules())
    names = pruned_layers(model, None)
    need = {n: sum(s * s for s in to_matrix(modules[n], modules[n].weight, None).shape) * 4 for n in names}
    bound = 3 * max(need.values())
    chunks = _chunks(names, modules, 4, bound)
    assert [n for c in chunks for n in c] == names and len(chunks) > 1
    assert all(sum(need[n] for n in c) <= bound for c in chunks)


def test_lower_gram_keeps_only_the_blocks_on_and_below_the_diagonal():
    from surgeon_fx.passes.curvature import LowerGram

    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(9, 600, generator=gen, dtype=torch.float64), torch.randn(5, 600, generator=gen,
                                                                                 dtype=torch.float64)
    acc = LowerGram(600, "cpu", torch.float64).add_gram_(x1)
    twin = acc.clone().add_gram_(x2)
    full = twin.full()
    torch.testing.assert_close(full, x1.T @ x1 + x2.T @ x2)
    assert torch.equal(full, full.T)
    torch.testing.assert_close(acc.full(), x1.T @ x1)  # the clone has its own buffer
    assert acc.flat.numel() == 3 * 256 ** 2 + 2 * 88 * 256 + 88 ** 2 < 0.7 * 600 ** 2


def test_store_keeps_half_of_each_symmetric_factor_and_returns_it_exactly(tmp_path):
    from surgeon_fx.passes.curvature import KronFactors
    from surgeon_fx.passes.factor_store import pack, unpack

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 64, generator=gen)
    A, G = X.T @ X, torch.randn(8, 8, generator=gen)  # G not symmetric: kept whole
    assert pack(A).numel() == 64 * 65 // 2 and torch.equal(unpack(pack(A)), A) and pack(G) is G
    for store in (FactorStore(), FactorStore(tmp_path / "f")):
        store.put("layer", KronFactors(A, G, 40))
        got = store["layer"]
        assert torch.equal(got.A, A) and torch.equal(got.G, G) and got.tokens == 40
    assert store.stored_bytes() == (tmp_path / "f" / "0.pt").stat().st_size
    in_memory = FactorStore()
    in_memory.put("layer", KronFactors(A, G, 40))
    assert in_memory.stored_bytes() == 4 * (64 * 65 // 2 + 8 * 8)
    full = tmp_path / "full.pt"
    torch.save({"A": A, "G": G}, full)
    assert (tmp_path / "f" / "0.pt").stat().st_size < 0.6 * full.stat().st_size
