"""The dense evaluation is cached per model digest and data digest; a changed weight or token misses."""
import io
from contextlib import redirect_stderr
from pathlib import Path

import torch

from surgeon_fx.cache import ResultCache, model_digest
from surgeon_fx.data import digest
from surgeon_fx.compile import compile_model
from surgeon_fx.hf import tiny_llama
from surgeon_fx.modelfile import load_model_file
from surgeon_fx.recipe import Recipe

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_digests_follow_every_weight_and_token():
    a, b = tiny_llama(), tiny_llama()
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-6
    assert model_digest(a) != model_digest(b)
    assert model_digest(a) != model_digest(tiny_llama(seed=1))
    ids = torch.arange(20).reshape(2, 10)
    changed = ids.clone()
    changed[1, 9] = 0
    assert digest({"w": ids}) == digest({"w": ids.clone()})
    assert digest({"w": ids}) != digest({"w": changed})
    assert digest({"w": ids}) != digest({"w": ids.reshape(4, 5)})
    assert digest({"w": ids, "b": 1}) != digest({"w": ids, "b": 2})


def test_entries_round_trip_and_a_broken_one_is_missing(tmp_path):
    cache = ResultCache(tmp_path)
    assert cache.get("k", "abc") is None
    cache.put("k", "abc", {"value": 1.5})
    assert cache.get("k", "abc") == {"value": 1.5}
    cache.path("k", "abc").write_text("{not json")
    assert cache.get("k", "abc") is None
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["abc.json"]  # no temporary files left


def test_a_rerun_takes_the_dense_evaluation_from_the_cache(tmp_path):
    mf = load_model_file(MODELS / "tiny_llama.py")
    recipe = Recipe(structure="unstructured", method="magnitude", target=0.5, eval_windows=2)
    cache = ResultCache(tmp_path / "cache")
    first = compile_model(mf, recipe, tmp_path / "a", progress=False, cache=cache)
    (entry,) = (tmp_path / "cache" / "dense-eval").iterdir()
    log = io.StringIO()
    with redirect_stderr(log):
        again = compile_model(mf, recipe, tmp_path / "b", progress="lines", cache=cache)
    assert "evaluate dense: from the cache" in log.getvalue() and entry.name[:-5] in log.getvalue()
    assert again.report["evaluation"] == first.report["evaluation"]
    fewer = compile_model(mf, Recipe(structure="unstructured", method="magnitude", target=0.5, eval_windows=1),
                          tmp_path / "c", progress=False, cache=cache)  # other windows: another entry
    assert len(list((tmp_path / "cache" / "dense-eval").iterdir())) == 2
    assert fewer.report["evaluation"]["windows"] == 1
