"""Compression reports: per-layer kept fractions, plots, and report.md / report.json.

Reusable pieces (a benchmark comparing several runs calls them directly):

* `weight_counts(model, masks)` — layer name → (layer type, weights kept) for every weight-carrying layer;
* `layer_rows(before, after)` — one `LayerRow` per layer with its kind (Q, K, V, QKV, O, gate, up/FC1,
  down/FC2, conv, embedding, other) and depth (the first integer in its name: the block index);
* `kept_by_depth(rows)`, `kept_by_kind(rows)` — parameter-weighted kept fractions;
* `plot_kept(runs, folder)` — kept_by_depth.png and kept_by_kind.png, one line / bar series per run;
* `environment()` — machine, torch version, git commit and date;
* `write_report(folder, report, runs)` — report.json (the dict as given), report.md and the plots.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from surgeon_fx.groups import param_name

REPORT_FILES = ("report.md", "report.json", "kept_by_depth.png", "kept_by_kind.png")
KIND_ORDER = ("Q", "K", "V", "QKV", "O", "gate", "up/FC1", "down/FC2", "conv", "embedding", "other")
_NAMES = {  # last name component -> kind (components that depend on their parent are handled in `layer_role`)
    "Q": {"q_proj", "q", "query", "wq", "q_lin"},
    "K": {"k_proj", "k", "key", "wk", "k_lin"},
    "V": {"v_proj", "v", "value", "wv", "v_lin"},
    "QKV": {"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value"},
    "O": {"o_proj", "out_proj", "o", "wo", "out_lin"},
    "gate": {"gate_proj", "gate", "w1"},
    "up/FC1": {"up_proj", "up", "fc1", "c_fc", "fc_in", "w3", "lin1", "dense_h_to_4h"},
    "down/FC2": {"down_proj", "down", "fc2", "fc_out", "w2", "lin2", "dense_4h_to_h"},
}
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class LayerRow:
    """One weight-carrying layer: `before` / `after` weights kept (its bias is not counted)."""

    name: str
    kind: str
    depth: int | None
    before: int
    after: int

    @property
    def kept(self) -> float:
        return self.after / self.before if self.before else 1.0


def layer_role(name: str, module_type: str) -> str:
    """The role of a layer from its qualified name and class name (see `KIND_ORDER`)."""
    parts = name.split(".")
    last, parent = parts[-1].lower(), ".".join(parts[:-1])
    for kind, names in _NAMES.items():
        if last in names:
            return kind
    if last in {"c_proj", "dense", "proj"}:  # GPT-2 / BERT-style names shared by attention and MLP
        return "O" if _ATTENTION.search(parent) else "down/FC2"
    if module_type == "Embedding":
        return "embedding"
    if module_type.startswith("Conv") and module_type != "Conv1D":
        return "conv"
    return "other"


def layer_depth(name: str) -> int | None:
    """The first integer component of a qualified name (the block index), None at top level."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def weight_counts(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[str, int]]:
    """Layer name → (class name, weights kept) for every module owning a ≥ 2-d `weight` (each tied tensor once).

    With `masks` (parameter name → bool keep-mask), a masked weight counts its kept entries only."""
    masks = masks or {}
    out, seen = {}, set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or id(weight) in seen:
            continue
        seen.add(id(weight))
        mask = masks.get(param_name(name))
        out[name] = (type(module).__name__, int(mask.sum()) if mask is not None else weight.numel())
    return out


def layer_rows(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> list[LayerRow]:
    """Join two `weight_counts` results (layers missing after pruning count as fully removed)."""
    return [LayerRow(name, layer_role(name, typ), layer_depth(name), count, after.get(name, (typ, 0))[1])
            for name, (typ, count) in before.items()]


def _fractions(rows: list[LayerRow], key) -> dict:
    sums: dict = {}
    for row in rows:
        k = key(row)
        if k is not None:
            b, a = sums.get(k, (0, 0))
            sums[k] = (b + row.before, a + row.after)
    return {k: a / b if b else 1.0 for k, (b, a) in sums.items()}


def kept_by_depth(rows: list[LayerRow]) -> dict[int, float]:
    """Block index → kept fraction of the weights of that block's layers."""
    return dict(sorted(_fractions(rows, lambda r: r.depth).items()))


def kept_by_kind(rows: list[LayerRow], blocks_only: bool = True) -> dict[str, float]:
    """Layer kind → kept fraction, in `KIND_ORDER`; by default only layers inside blocks (depth not None)."""
    fr = _fractions(rows, lambda r: r.kind if r.depth is not None or not blocks_only else None)
    return {k: fr[k] for k in KIND_ORDER if k in fr}


def plot_kept(runs: dict[str, list[LayerRow]], folder: str | Path) -> list[Path]:
    """Write kept_by_depth.png and kept_by_kind.png into `folder`, one series per run label."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    folder = Path(folder)
    paths = []
    fig = Figure(figsize=(8.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for label, rows in runs.items():
        depth = kept_by_depth(rows)
        ax.plot(list(depth), list(depth.values()), marker="o", label=label)
    ax.set(xlabel="layer depth (block index)", ylabel="fraction of weights kept", ylim=(0, 1.05),
           title="Kept fraction per layer depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(folder / "kept_by_depth.png")
    fig.savefig(paths[-1], dpi=110)

    fig = Figure(figsize=(8.5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    kinds = [k for k in KIND_ORDER if any(k in kept_by_kind(rows) for rows in runs.values())]
    width = 0.8 / max(1, len(runs))
    for i, (label, rows) in enumerate(runs.items()):
        by_kind = kept_by_kind(rows)
        ax.bar([x + i * width for x in range(len(kinds))], [by_kind.get(k, 0.0) for k in kinds], width,
               label=label)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(kinds))], kinds)
    ax.set(ylabel="fraction of weights kept", ylim=(0, 1.05), title="Kept fraction per layer type")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(folder / "kept_by_kind.png")
    fig.savefig(paths[-1], dpi=110)
    return paths


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD commit of the git checkout holding `path` (default: this package), None outside git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    """Machine, Python/torch versions, accelerator, git commit and the date (UTC, ISO 8601)."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda_device": cuda, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _num(n: float) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n:,.0f}"


def render_markdown(report: dict) -> str:
    """report.md from the report dict that `surgeon_fx.compile` builds (missing sections are skipped)."""
    r, env = report, report.get("environment", {})
    p = r["parameters"]
    lines = [f"# surgeon-fx report: {r['source']['name']}", "",
             f"{r['recipe']['method']}, {r['recipe']['structure']}"
             + (f", target {r['recipe']['target']:g} of prunable parameters kept" if not r.get("nm") else "")
             + f", {r['recipe']['shots']} shot(s) — {env.get('date', '')}", "",
             "## Parameters", "", "| | before | after | kept |", "|---|---:|---:|---:|",
             f"| all | {_num(p['before'])} | {_num(p['after'])} | {p['after'] / p['before']:.1%} |",
             f"| prunable | {_num(p['prunable_before'])} | {_num(p['prunable_after'])} | "
             f"{p['prunable_after'] / max(1, p['prunable_before']):.1%} |", ""]
    if p.get("note"):
        lines += [p["note"], ""]
    ev = r.get("evaluation")
    if ev:
        metric = ev["metric"]
        lines += ["## Evaluation", "", f"{metric} on {ev['windows']} window(s) × {ev['length']} tokens"
                  if metric == "perplexity" else f"mean {metric} over {ev['windows']} batch(es)", "",
                  f"| | {metric} |", "|---|---:|", f"| before | {ev['before']:.4g} |", f"| after | {ev['after']:.4g} |",
                  ""]
    if r.get("shots"):
        lines += ["## Shots", "", "| shot | target | achieved | est. cost | seconds |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['shot']} | {s['target']:.3f} | {s['achieved']:.3f} | {s['cost']:.3g} | {s['seconds']:.1f} |"
                  for s in r["shots"]]
        lines.append("")
    lines += ["## Kept fraction per layer type and depth", "", "![per type](kept_by_kind.png)",
              "![per depth](kept_by_depth.png)", "", "| type | kept |", "|---|---:|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in r["kept_by_kind"].items()]
    lines += ["", "| depth | kept |", "|---:|---:|"] + [f"| {k} | {v:.1%} |" for k, v in r["kept_by_depth"].items()]
    if r.get("groups"):
        lines += ["", "## Groups", "", "| group | kind | units | kept |", "|---|---|---:|---:|"]
        lines += [f"| {g['name']} | {g['kind']} | {g['units']} | {g['kept']} |" for g in r["groups"]]
    lines += ["", "## Layers", "", "| layer | type | weights before | after | kept |", "|---|---|---:|---:|---:|"]
    lines += [f"| {row['name']} | {row['kind']} | {row['before']:,} | {row['after']:,} | "
              f"{row['after'] / max(1, row['before']):.1%} |" for row in r["layers"]]
    lines += ["", "## Stages", "", "| stage | seconds | peak RSS (MB) | peak accelerator memory (MB) |",
              "|---|---:|---:|---:|"]
    lines += [f"| {s['name']} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} | "
              f"{'' if s.get('cuda_peak_mb') is None else format(s['cuda_peak_mb'], '.0f')} |" for s in r["stages"]]
    lines += ["", "## Output", ""] + [f"- {line}" for line in r.get("output", [])]
    lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path, report: dict, runs: dict[str, list[LayerRow]]) -> list[Path]:
    """Write report.json, report.md and the kept-fraction plots of `runs` into `folder`; returns the paths."""
    folder = Path(folder)
    paths = plot_kept(runs, folder)
    (folder / "report.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n",
                                        encoding="utf-8")
    (folder / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return [folder / "report.json", folder / "report.md"] + paths


def json_safe(value):
    """`value` with every non-finite float as the string "nan", "inf" or "-inf" (bare NaN is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def rows_as_dicts(rows: list[LayerRow]) -> list[dict]:
    """LayerRows as JSON-ready dicts."""
    return [asdict(row) for row in rows]
