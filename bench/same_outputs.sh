#!/usr/bin/env bash
# Do two checkouts of surgeon-fx compile the tiny Llama to the same weights?  Runs the same three
# surgeon-compile commands (structured 0.8 in two shots, unstructured 0.5, 2:4 SparseGPT) with the code of
# each folder and compares model.safetensors tensor by tensor, the reported perplexities and recipes.
#   bash bench/same_outputs.sh OLD_CHECKOUT NEW_CHECKOUT [WORK_DIR]
# A checkout is a folder of the repository (e.g. `git worktree add /tmp/old <commit>`); each runs with its
# own folder first on PYTHONPATH (the older layout kept `passes` at the top level), one thread.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); work=${3:-$(mktemp -d)}
mkdir -p "$work"
[ -e "$new/surgeon_fx/passes" ] || ln -s ../passes "$new/surgeon_fx/passes"  # the new layout, uninstalled
run() { # checkout tag args...
  local dir=$1 tag=$2; shift 2
  (cd "$dir" && PYTHONPATH="$dir" OMP_NUM_THREADS=1 python -c \
    "import sys; from surgeon_fx.cli import main; sys.exit(main(sys.argv[1:]))" \
    "$@" --out "$work/$tag" --overwrite > "$work/$tag.log" 2>&1)
}
cases=("s08:--target 0.8 --shots 2 --calib-windows 4 --calib-length 64"
       "u05:--structure unstructured --target 0.5 --shots 2 --calib-windows 4 --calib-length 64"
       "nm24:--structure 2:4 --method sparsegpt --calib-windows 4 --calib-length 64")
for spec in "${cases[@]}"; do
  name=${spec%%:*}; read -r -a args <<< "${spec#*:}"
  run "$old" "old_$name" "$old/models/tiny_llama.py" "${args[@]}"
  run "$new" "new_$name" "$new/models/tiny_llama.py" "${args[@]}"
done
WORK="$work" python - <<'PY'
import json, os
from safetensors.torch import load_file
work = os.environ["WORK"]
for n in ("s08", "u05", "nm24"):
    a, b = (load_file(f"{work}/{t}_{n}/model.safetensors") for t in ("old", "new"))
    same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    ra, rb = (json.load(open(f"{work}/{t}_{n}/report.json")) for t in ("old", "new"))
    print(f"{n}: tensors bit-identical {same}; perplexity after {ra['evaluation']['after']:.6f} / "
          f"{rb['evaluation']['after']:.6f}; recipe equal {ra['recipe'] == rb['recipe']}")
PY
