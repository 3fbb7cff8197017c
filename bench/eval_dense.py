"""Dense SmolLM2-135M perplexity on WikiText-2 raw test (2048-token windows).

    python bench/eval_dense.py [--windows 8] [--full] [--threads 2]

Writes docs/results/dense_ppl.json with the machine, git commit, date, window
count, perplexity and wall time of the evaluation (model loading excluded).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon_fx.data import eval_windows, read_text, tokenize  # noqa: E402
from surgeon_fx.evaluate import perplexity  # noqa: E402
from surgeon_fx.hf import load_smollm2  # noqa: E402

TEST_TEXT = ROOT / "../shared/data/wikitext-2-raw/wiki.test.raw"
OUT = ROOT / "docs/results/dense_ppl.json"


def git_commit() -> str:
    run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="first k windows (default 8)")
    parser.add_argument("--full", action="store_true", help="the whole test split (147 windows)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    ids = tokenize(tokenizer, read_text(TEST_TEXT))
    windows = eval_windows(ids, args.length, limit=None if args.full else args.windows)
    start = time.perf_counter()
    result = perplexity(model, windows)
    wall = time.perf_counter() - start

    record = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "data": "wikitext-2-raw wiki.test.raw, tokenized once, non-overlapping windows",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__},
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "window_length": args.length,
        "k": result.windows,
        "total_windows": ids.numel() // args.length,
        "tokens_predicted": result.tokens,
        "nll": result.nll,
        "ppl": result.ppl,
        "wall_s": round(wall, 2),
    }
    print(json.dumps(record, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
