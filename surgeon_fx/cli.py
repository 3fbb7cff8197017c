"""`surgeon-compile`: the command line front door (argument parsing, error lines, the final summary).

The work itself is `surgeon_fx.compile.compile_model`; options override a `--recipe` file, which overrides the
defaults of `surgeon_fx.recipe.Recipe`.  The pipeline (and torch) is imported inside `main`, so that Ctrl-C at
any moment, start-up included, ends with one line; SIGTERM is handled like Ctrl-C (temporary files removed).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

PROG = "surgeon-compile"
DESCRIPTION = """\
Prune a PyTorch model with The LLM Surgeon (or a baseline) and write a smaller model that reloads.

MODEL is a Python file defining build() -> nn.Module, plus example_inputs() -> tuple (unless build returns
a Hugging Face causal LM) and optionally calibration(n, length, seed), evaluation(), tokenizer() and, for a
model that is not a causal LM, loss(model, batch).  Ready files are in models/ (smollm2.py, tiny_llama.py,
tiny_opt.py, tiny_gpt2.py, tiny_qwen2.py, resnet_cnn.py, vit_encoder.py).  Instead of MODEL, --hf PATH
compiles a local Hugging Face model folder (with --calib-file).

Structured pruning removes whole attention heads, KV heads, MLP neurons and conv channels, found by tracing
the model into a dependency graph, and writes a physically smaller model; unstructured and N:M pruning set
weights to zero in dense tensors.

The output folder (--out) gets model.safetensors, manifest.json (how to rebuild the module tree),
report.md / report.json with kept-fraction plots, for Hugging Face models an hf/ folder that
AutoModelForCausalLM.from_pretrained loads (with trust_remote_code=True when layers keep different widths:
the folder then carries its modeling file), and source/ (a copy of MODEL).  Load the result with surgeon_fx.load(OUT) (add trust_source=True for a model that is not a Hugging
Face one: loading runs its model file).  It is written to a temporary folder and renamed when complete; on any
error nothing is written, and two runs never write the same --out at once."""
EPILOG = """\
examples:
  # SmolLM2-135M, 80% of the prunable parameters kept, CPU-sized calibration (the README's quick start)
  surgeon-compile models/smollm2.py --target 0.8 --shots 1 --calib-windows 4 --calib-length 256 \\
      --eval-windows 2 --out out/smollm2-s80

  # calibrate on Python source (a glob), evaluate on other files, then on SliceGPT for comparison
  surgeon-compile models/smollm2.py --calib-file 'src/**/*.py' --eval-file tests/ --out out/code-s80
  surgeon-compile models/smollm2.py --method slicegpt --target 0.8 --out out/slice-s80

  # a tiny random Llama in seconds, 2:4 semi-structured with SparseGPT
  surgeon-compile models/tiny_llama.py --structure 2:4 --method sparsegpt --calib-length 128

  # options from a recipe file, one of them overridden
  surgeon-compile models/vit_encoder.py --recipe recipe.toml --target 0.6

  # a local Hugging Face folder, calibration text from any file, on the first GPU
  surgeon-compile --hf ./my-llama --calib-file corpus.txt --device cuda:0 --out out/my-llama

  # a model larger than the GPU: weights in CPU memory, onloaded module by module; factors in files
  surgeon-compile --hf ./llama-13b --calib-file corpus.txt --device cuda --offload-model \
      --offload-dir /scratch/factors --factor-memory 30 --out out/llama-13b-s80

  # data-parallel curvature on 4 GPUs (torchrun; rank 0 writes the output)
  surgeon-compile --hf ./llama-7b --calib-file corpus.txt --device cuda --nproc 4 --out out/llama-7b-s80

  # continue an interrupted run from its last finished shot
  surgeon-compile models/smollm2.py --target 0.7 --shots 10 --out out/s70 --resume

exit status: 0 on success, 2 for a bad input (one line on stderr names it), 1 for an internal error."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every recipe option defaults to None so that only given options override."""
    from surgeon_fx.methods import METHODS
    from surgeon_fx.recipe import Recipe

    d = Recipe()
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="the model file (see above)")
    p.add_argument("--hf", metavar="PATH", help="a local Hugging Face model folder instead of a model file")
    p.add_argument("--out", metavar="DIR", help="output folder (default: ./<model>-<structure>[-<target %%>])")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier surgeon-compile output (or an empty folder); other folders are refused")
    p.add_argument("--recipe", metavar="TOML", help="read options from a flat TOML file; options given here win")
    what = p.add_argument_group("what to prune")
    what.add_argument("--structure", metavar="{structured,unstructured,2:4,4:8,N:M}",
                      help=f"structured (heads, neurons, channels removed), 2:4 / 4:8 / N:M (N of every M weights kept) "
                           f"or unstructured (default: {d.structure})")
    what.add_argument("--target", type=float, metavar="FRACTION",
                      help=f"fraction of the PRUNABLE parameters kept, between 0 and 1 (the weights of the pruned "
                           f"layers; ignored for N:M, which keeps N/M) (default: {d.target})")
    what.add_argument("--round-to", type=int, metavar="K",
                      help=f"structured: keep the neurons/channels of every layer a multiple of K, for fast kernels "
                           f"(default: {d.round_to})")
    how = p.add_argument_group("how to prune")
    how.add_argument("--method", choices=list(METHODS),
                     help=f"surgeon: The LLM Surgeon (KFAC curvature, correlated updates); magnitude, l-obd, k-obd: "
                          f"the paper's baselines; sparsegpt, wanda: one-shot unstructured/N:M; flap, wanda-sp: "
                          f"one-shot structured peers; slicegpt: structured, the residual stream rotated (PCA) and "
                          f"sliced to round(target x width) channels, RMSNorm models (default: {d.method})")
    how.add_argument("--shots", type=int, metavar="N", help=f"pruning shots, the target reached linearly "
                                                            f"(default: {d.shots}; the paper uses 40 structured)")
    how.add_argument("--fisher", choices=("empirical", "sampled"),
                     help=f"Fisher labels: the data (empirical) or drawn from the model (default: {d.fisher})")
    how.add_argument("--update", choices=("consumer", "correlated", "none"),
                     help=f"structured surgeon: compensate removed units in the layers that read them (consumer), in "
                          f"every layer they touch as the paper does (correlated), or not at all (default: {d.update})")
    how.add_argument("--nm-select", choices=("sequential", "fixed"),
                     help=f"N:M surgeon: choose the kept N of each M inputs during the update's column sweep, on the "
                          f"compensated weights (sequential, as SparseGPT), or before it (fixed) (default: {d.nm_select})")
    how.add_argument("--lora-rank", type=int, metavar="R", help="train rank-R masked low-rank corrections between "
                                                                "shots, absorbed into the weights (default: 0, off)")
    how.add_argument("--lora-steps", type=int, metavar="S", help=f"Adam steps of those corrections per shot, one "
                                                                 f"calibration window each (default: {d.lora_steps})")
    data = p.add_argument_group("data")
    data.add_argument("--calib-windows", type=int, metavar="N",
                      help=f"calibration windows (default: {d.calib_windows}; the paper uses 128)")
    data.add_argument("--calib-length", type=int, metavar="L",
                      help=f"tokens per calibration window (default: {d.calib_length}; the paper uses 2048)")
    data.add_argument("--calib-file", metavar="TEXT", help="calibration text: a file, a folder or a quoted glob "
                                                           "('src/**/*.py'), tokenized with the model file's "
                                                           "tokenizer() (default: the model file's calibration())")
    data.add_argument("--eval-windows", type=int, metavar="K",
                      help="evaluate perplexity on the first K evaluation windows (default: all)")
    data.add_argument("--eval-file", metavar="TEXT", help="evaluation text: a file, a folder or a quoted glob "
                                                          "(default: the model file's evaluation())")
    data.add_argument("--eval-length", type=int, metavar="L",
                      help=f"tokens per window of --eval-file (default: {d.eval_length})")
    data.add_argument("--batch-size", type=int, metavar="B", help=f"windows per forward pass (default: {d.batch_size})")
    data.add_argument("--seed", type=int, help=f"seed of the calibration windows and sampling (default: {d.seed})")
    run = p.add_argument_group("running")
    run.add_argument("--device", metavar="DEV", help=f"cpu, cuda or cuda:N (default: {d.device})")
    run.add_argument("--nproc", type=int, metavar="N", help="collect curvature in N processes (torchrun; NCCL on "
                     "GPUs, one per process, gloo on the CPU); rank 0 writes the output (default: 1)")
    run.add_argument("--offload-model", action="store_const", const=True,
                     help="keep the weights in CPU memory and run each module on --device only while it computes "
                          "(accelerate), for models larger than the device")
    run.add_argument("--offload-dir", metavar="DIR", help="keep curvature factors in files under DIR between "
                     "collection and the shot (default: CPU memory on a GPU run)")
    run.add_argument("--factor-memory", type=float, metavar="GIB", help="bound on the curvature accumulators alive "
                     "at once; more passes over the data when the layers need more (default: no bound)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint of an interrupted run (kept in <out>.work/ beside the output)")
    run.add_argument("--cache", metavar="DIR", help="where results that repeat between runs are kept: the dense "
                                                    "model's evaluation, keyed by the digests of its weights and "
                                                    "data (default: $SURGEON_CACHE or ~/.cache/surgeon-fx)")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    run.add_argument("--quiet", action="store_true",
                     help="no progress on stderr (default: bars on a terminal; otherwise one line per finished stage, "
                          "curvature pass and shot, with the seconds since the start)")
    run.add_argument("--traceback", action="store_true", help="show the full traceback of an internal error")
    return p


OPTION_FIELDS = ("structure", "target", "round_to", "method", "shots", "fisher", "update", "nm_select", "lora_rank", "lora_steps",
                 "calib_windows", "calib_length", "calib_file", "eval_windows", "eval_file", "eval_length",
                 "batch_size", "seed", "device", "offload_model", "offload_dir", "factor_memory")


def default_out(name: str, recipe) -> Path:
    """./<model stem>-<structure>[-<target percent>]."""
    tag = str(recipe.structure).replace(":", "of")
    return Path(f"{Path(name).stem}-{tag}" + ("" if recipe.structure.nm else f"-{round(recipe.target * 100)}"))


def summary(result) -> str:
    """What was written, in a few lines for the terminal."""
    r, out = result.report, result.out
    p = r["parameters"]
    lines = [f"{PROG}: wrote {out}",
             f"  model       {r['source']['name']}: {r['recipe']['method']}, {r['recipe']['structure']}"
             + ("" if r["nm"] else f", target {r['recipe']['target']:g}"),
             f"  parameters  {p['before']:,} -> {p['after']:,} (prunable kept "
             f"{p['prunable_after'] / max(1, p['prunable_before']):.1%}"
             + ("" if r["nm"] else f", target {r['recipe']['target']:.1%}") + ")"]
    ev = r.get("evaluation")
    if ev:
        where = (f"{ev['windows']} windows x {ev['length']} tokens" if ev["length"] else f"{ev['windows']} batches")
        lines.append(f"  {ev['metric']:<11} {ev['before']:.4g} -> {ev['after']:.4g} ({where})")
    from surgeon_fx.trace import is_hf_model

    trust = "" if is_hf_model(result.model) else ", trust_source=True"  # loading runs the model file
    lines.append(f"  weights     {out / 'model.safetensors'}   load: surgeon_fx.load({str(out)!r}{trust})")
    hf_note = next((line for line in r["output"] if line.endswith("/hf")), None)
    if hf_note:
        cls = r["source"].get("hf_class") or "AutoModelForCausalLM"
        remote = ", trust_remote_code=True" if (Path(hf_note) / "modeling_surgeon.py").exists() else ""
        lines.append(f"  hf/         {'AutoModelForCausalLM' if cls.endswith('ForCausalLM') else cls}"
                     f".from_pretrained({hf_note!r}{remote})")
    lines.append(f"  report      {out / 'report.md'}")
    lines.append(f"  time        {sum(s['seconds'] for s in r['stages']):.1f} s ("
                 + ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in r["stages"]) + ")")
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM arrived: unwinds like KeyboardInterrupt, so that temporary files are removed."""


class _Signals:
    """The handler of SIGINT and SIGTERM while the command runs: remembers the signal and raises `Interrupted`.
    Remembering matters because a library may turn the interruption into another error (torch and transformers
    report an interrupted import as an ImportError); the command still reports the interruption."""

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame):
        self.received = signum
        raise Interrupted


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 bad input, 1 internal error, 130 interrupted,
    143 terminated)."""
    signals = _Signals()
    previous = {s: signal.signal(s, signals) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(argv, signals)
    except BaseException:
        if signals.received is None:
            raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    name = "interrupted" if signals.received == signal.SIGINT else "terminated"
    print(f"{PROG}: {name}; rerun with --resume to continue from the last finished shot", file=sys.stderr)
    return 128 + signals.received


def _run(argv: list[str] | None, signals: _Signals) -> int:
    args = build_parser().parse_args(argv)
    from surgeon_fx import distributed

    if args.nproc is not None and args.nproc < 1:
        print(f"{PROG}: error: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
        return 2
    if (args.nproc or 1) > 1 and not distributed.launched():
        return distributed.relaunch(_without_nproc(sys.argv[1:] if argv is None else argv), args.nproc)
    from surgeon_fx.cache import ResultCache, default_folder
    from surgeon_fx.compile import USER_ERRORS, CompileError, compile_model
    from surgeon_fx.modelfile import from_hf_folder, load_model_file
    from surgeon_fx.recipe import Recipe

    try:
        if (args.model is None) == (args.hf is None):
            raise CompileError("give either a model file or --hf PATH (exactly one)")
        recipe = Recipe.from_toml(args.recipe) if args.recipe else Recipe()
        recipe = recipe.merged({k: getattr(args, k) for k in OPTION_FIELDS})
        recipe = recipe.merged({"device": distributed.join(recipe.device)})
        mf = load_model_file(args.model) if args.model else from_hf_folder(args.hf)
        out = Path(args.out) if args.out else default_out(mf.name, recipe)
        result = compile_model(mf, recipe, out, resume=args.resume, overwrite=args.overwrite,
                               progress=False if args.quiet else None,
                               cache=None if args.no_cache else ResultCache(args.cache or default_folder()))
    except USER_ERRORS as err:
        if signals.received is not None:  # what the interruption became inside a library
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: one line unless asked for the traceback
        if args.traceback or signals.received is not None:
            raise
        print(f"{PROG}: error: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --traceback)",
              file=sys.stderr)
        return 1
    main_rank = distributed.rank() == 0
    distributed.leave()
    if main_rank:
        print(summary(result))
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """argv without its --nproc option (as `--nproc N` or `--nproc=N`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
