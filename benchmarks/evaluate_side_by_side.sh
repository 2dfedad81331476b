#!/usr/bin/env bash
# Time `python -m covidxr.evaluate --external` with two source trees, alternating, on the same machine in one run.
#
#   bash benchmarks/evaluate_side_by_side.sh BEFORE_TREE AFTER_TREE CHECKPOINT DATA EXTERNAL [ROUNDS]
#
# e.g. BEFORE_TREE a `git worktree add --detach ../before ad4d0ed` (the code before issue #28), AFTER_TREE this
# checkout. Each round runs before then after with default options (bootstrap 1000, lung share over up to 200 films,
# failure gallery) into a fresh folder under ${OUT:-/tmp/evaluate-side-by-side}; prints one line per run (wall
# seconds, load average) and checks that both give the same predictions to the bit.
set -euo pipefail
before=$(realpath "$1") after=$(realpath "$2") ckpt=$(realpath "$3") data=$(realpath "$4")
external=$(realpath "$5") rounds=${6:-3}
out=$(realpath -m "${OUT:-/tmp/evaluate-side-by-side}")
mkdir -p "$out"
for round in $(seq "$rounds"); do
  for side in before after; do
    src=$before; [ "$side" = after ] && src=$after
    dest=$out/$side-$round; rm -rf "$dest"
    start=$(date +%s.%N)
    # run from inside the tree: `python -m` puts the working folder first on sys.path, ahead of any installed copy
    (cd "$src" && PYTHONPATH=$src python -m covidxr.evaluate --checkpoint "$ckpt" --data "$data" \
      --external "$external" --out "$dest" --device cpu > "$dest.log" 2>&1)
    grep -q "^$src/covidxr/" <(cd "$src" && python -c "import covidxr; print(covidxr.__file__)") \
      || { echo "$side: covidxr is not imported from $src" >&2; exit 1; }
    echo "$side round $round: $(echo "$(date +%s.%N) - $start" | bc) s, load $(cut -d' ' -f1 /proc/loadavg)"
  done
  python - "$out/before-$round" "$out/after-$round" <<'PY'
import sys
from pathlib import Path

import pandas as pd

a, b = map(Path, sys.argv[1:])
for name in sorted(p.name for p in a.glob("predictions*.csv")):
    x, y = pd.read_csv(a / name), pd.read_csv(b / name)
    cols = [c for c in x.columns if c.startswith("raw_")] + [c[4:] for c in x.columns if c.startswith("raw_")]
    diff = float((x[cols] - y[cols]).abs().to_numpy().max())
    print(f"  {name}: {len(x)} films, largest probability difference {diff:.1e}")
PY
done
