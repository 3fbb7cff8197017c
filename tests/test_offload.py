"""Models larger than the device, checked on the CPU: accelerate keeps the weights off the module while it is not
running, collection gives the same factors, and the model gets its own parameters back; the pipeline's factor
options reach `collect_kfac`."""
import torch

from surgeon_fx.methods import RunContext, collect_factors
from surgeon_fx.passes.curvature import collect_kfac
from surgeon_fx.passes.factor_store import FactorStore
from surgeon_fx.passes.offload import offloaded
from surgeon_fx.recipe import Recipe
from tests.test_surgeon import tiny_llama, windows


def test_offloaded_collection_equals_resident_and_restores_parameters():
    model, win = tiny_llama(), windows(3, 12)
    resident = collect_kfac(model, win)
    before = {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    seen = {}

    def record(module, args):
        seen.setdefault("devices", set()).update(p.device.type for p in model.parameters() if p is not module.weight)

    handle = model.model.layers[0].mlp.up_proj.register_forward_pre_hook(record)
    with offloaded(model, "cpu"):
        idle = {p.device.type for p in model.parameters()}
        off = collect_kfac(model, win)
    handle.remove()
    assert idle == {"meta"}  # nothing resident between modules
    assert "meta" in seen["devices"]  # while one module runs, the others stay off
    for name, f in resident.items():
        assert torch.equal(f.A, off[name].A) and torch.equal(f.G, off[name].G)
    for n, p in model.named_parameters():
        same, value, flag = before[n]
        assert p is same and torch.equal(p, value) and p.requires_grad == flag


def test_collect_factors_keeps_factors_in_files_with_bounded_chunks(tmp_path):
    model, win = tiny_llama(), windows(2, 8)
    recipe = Recipe(offload_dir=str(tmp_path), factor_memory=1e-5)  # ≈ 10 kB: several chunks
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    got = collect_factors(model, win, recipe=recipe, layers=layers, ctx=RunContext())
    want = collect_kfac(model, win, layers=layers)
    assert isinstance(got, FactorStore) and len(list(tmp_path.glob("*.pt"))) == len(layers)
    for name in layers:
        assert torch.equal(got[name].A, want[name].A) and torch.equal(got[name].G, want[name].G)
