"""Report building blocks: layer kinds and depths, kept fractions, plots, report.md / report.json."""
import json

import pytest
import torch
from torch import nn

from surgeon_fx import report


@pytest.mark.parametrize("name,typ,kind", [
    ("model.layers.3.self_attn.q_proj", "Linear", "Q"),
    ("model.layers.3.self_attn.k_proj", "Linear", "K"),
    ("model.layers.3.self_attn.v_proj", "Linear", "V"),
    ("model.layers.3.self_attn.o_proj", "Linear", "O"),
    ("model.layers.3.mlp.gate_proj", "Linear", "gate"),
    ("model.layers.3.mlp.up_proj", "Linear", "up/FC1"),
    ("model.layers.3.mlp.down_proj", "Linear", "down/FC2"),
    ("transformer.h.0.attn.c_attn", "Conv1D", "QKV"),
    ("transformer.h.0.attn.c_proj", "Conv1D", "O"),
    ("transformer.h.0.mlp.c_fc", "Conv1D", "up/FC1"),
    ("transformer.h.0.mlp.c_proj", "Conv1D", "down/FC2"),
    ("model.decoder.layers.1.self_attn.out_proj", "Linear", "O"),
    ("model.decoder.layers.1.fc1", "Linear", "up/FC1"),
    ("model.decoder.layers.1.fc2", "Linear", "down/FC2"),
    ("blocks.0.conv1", "Conv2d", "conv"),
    ("model.embed_tokens", "Embedding", "embedding"),
    ("lm_head", "Linear", "other"),
])
def test_layer_role(name, typ, kind):
    assert report.layer_role(name, typ) == kind


def test_layer_depth():
    assert report.layer_depth("model.layers.12.mlp.up_proj") == 12
    assert report.layer_depth("lm_head") is None


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 4)])
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_weight_counts_ties_and_masks():
    model = Tied()
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:3] = True
    counts = report.weight_counts(model, {"blocks.0.weight": mask})
    assert counts == {"emb": ("Embedding", 40), "blocks.0": ("Linear", 12), "blocks.1": ("Linear", 24)}


def test_kept_fractions_are_parameter_weighted():
    rows = report.layer_rows({"b.0.q": ("Linear", 100), "b.0.k": ("Linear", 100), "b.1.q": ("Linear", 50),
                              "head": ("Linear", 10)},
                             {"b.0.q": ("Linear", 50), "b.0.k": ("Linear", 100), "b.1.q": ("Linear", 0),
                              "head": ("Linear", 10)})
    assert report.kept_by_depth(rows) == {0: 0.75, 1: 0.0}
    assert report.kept_by_kind(rows) == {"Q": 50 / 150, "K": 1.0}
    assert report.kept_by_kind(rows, blocks_only=False)["other"] == 1.0
    assert rows[0].kept == 0.5


def _rows(scale):
    names = ["m.layers.0.q_proj", "m.layers.0.up_proj", "m.layers.1.q_proj", "m.layers.1.up_proj"]
    return report.layer_rows({n: ("Linear", 100) for n in names},
                             {n: ("Linear", int(100 * scale * (i + 1) / 4)) for i, n in enumerate(names)})


def test_plots_for_several_runs(tmp_path):
    paths = report.plot_kept({"surgeon 0.7": _rows(0.7), "magnitude 0.7": _rows(0.5)}, tmp_path)
    assert [p.name for p in paths] == ["kept_by_depth.png", "kept_by_kind.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_write_report(tmp_path):
    rows = _rows(0.8)
    data = {"source": {"name": "m.py"}, "nm": False,
            "recipe": {"method": "surgeon", "structure": "structured", "target": 0.8, "shots": 2},
            "parameters": {"before": 1000, "after": 800, "prunable_before": 400, "prunable_after": 200, "note": None},
            "groups": [{"name": "m.layers.0.mlp.neurons", "kind": "neurons", "units": 8, "kept": 5}],
            "layers": report.rows_as_dicts(rows), "kept_by_depth": report.kept_by_depth(rows),
            "kept_by_kind": report.kept_by_kind(rows),
            "evaluation": {"metric": "perplexity", "before": 20.0, "after": 22.5, "windows": 2, "length": 256},
            "shots": [{"shot": 1, "target": 0.9, "achieved": 0.9, "cost": 1e-3, "seconds": 1.5}],
            "stages": [{"name": "prune", "seconds": 1.5, "peak_rss_mb": 300.0, "cuda_peak_mb": None}],
            "output": ["out/model.safetensors"], "environment": report.environment()}
    paths = report.write_report(tmp_path, data, {"run": rows})
    assert {p.name for p in paths} == set(report.REPORT_FILES)
    assert json.loads((tmp_path / "report.json").read_text())["parameters"]["after"] == 800
    md = (tmp_path / "report.md").read_text()
    for needle in ("# surgeon-fx report: m.py", "perplexity on 2 window(s) × 256 tokens", "| before | 20 |",
                   "| after | 22.5 |", "| prunable | 400 | 200 | 50.0% |", "kept_by_kind.png", "| prune | 1.50 | 300 |",
                   "m.layers.0.mlp.neurons", "torch:", "date:"):
        assert needle in md, needle


def test_environment():
    env = report.environment()
    assert env["torch"] == torch.__version__ and env["date"] and env["cpus"] >= 1
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
