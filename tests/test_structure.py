"""One owner per decision: `Structure` (structure and target) and the method registry (method × structure)."""
import pytest

from surgeon_fx.methods import METHODS, resolve, surgeon_config
from surgeon_fx.recipe import Recipe, RecipeError
from surgeon_fx.structure import Structure, StructureError


@pytest.mark.parametrize("text,kind,nm,kept", [
    ("structured", "structured", None, 0.7), ("unstructured", "unstructured", None, 0.7),
    ("2:4", "nm", (2, 4), 0.5), ("3:8", "nm", (3, 8), 0.375),
])
def test_parse(text, kind, nm, kept):
    s = Structure.parse(text)
    assert (s.kind, s.nm, s.kept(0.7), str(s)) == (kind, nm, kept, text)
    assert s.structured == (kind == "structured") and Structure.parse(s) is s


@pytest.mark.parametrize("text", ["", "dense", "4:2", "0:4", "2:2", "a:b", "2:4:8", 2])
def test_parse_refuses(text):
    with pytest.raises(StructureError):
        Structure.parse(text)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, float("nan"), float("inf"), "0.5", True])
def test_target_rule(target):
    with pytest.raises(StructureError, match="target must be"):
        Structure.parse("structured").check_target(target)
    Structure.parse("2:4").check_target(target)  # N:M keeps N/M whatever the target


def test_recipe_holds_a_structure():
    r = Recipe(structure="2:4")
    assert r.structure == Structure("nm", 2, 4) and r.to_dict()["structure"] == "2:4"
    assert Recipe().merged({"structure": "4:8"}).structure.nm == (4, 8)
    with pytest.raises(RecipeError, match="structure must be one of"):
        Recipe().merged({"structure": "sideways"})
    with pytest.raises(RecipeError, match="target must be between 0 and 1"):
        Recipe(target=1.5).check()


def test_registry_decides_method_by_structure():
    assert resolve(Recipe(method="sparsegpt", structure="2:4")) is METHODS["sparsegpt"]
    with pytest.raises(RecipeError, match="does not support structure structured"):
        resolve(Recipe(method="wanda"))
    with pytest.raises(RecipeError, match="method must be one of"):
        resolve(Recipe(method="nope"))
    with pytest.raises(RecipeError, match="lora-rank"):
        resolve(Recipe(method="sparsegpt", structure="unstructured", lora_rank=2))
    assert not METHODS["magnitude"].needs_data and METHODS["surgeon"].multishot


def test_surgeon_config_from_recipe():
    c = surgeon_config(Recipe(structure="2:4", target=0.9, shots=2), "diag_ga")
    assert c.structure.nm == (2, 4) and c.target == 0.5 and c.curvature == "diag_ga" and c.shots == 2
    assert c.g_damping() == 0.1 and surgeon_config(Recipe(), "kfac").g_damping() == 0.01
    lora = surgeon_config(Recipe(lora_rank=8, lora_steps=32), "kfac")
    assert (lora.lora_rank, lora.lora_steps) == (8, 32)
    assert surgeon_config(Recipe(structure="2:4", nm_select="fixed"), "kfac").nm_select == "fixed"
    with pytest.raises(RecipeError, match="nm_select must be one of"):
        Recipe(nm_select="greedy").check()
    with pytest.raises(RecipeError, match="lora_steps must be at least 1"):
        Recipe(lora_rank=8, lora_steps=0).check()
