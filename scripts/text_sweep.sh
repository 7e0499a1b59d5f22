#!/usr/bin/env bash
# The text benchmark one paradigm per process, so that its four paradigms can share the
# cores with other jobs and finish on whichever process is free. Each worker takes the next
# paradigm nobody has claimed (a claim is a directory made atomically under OUT/claims),
# runs `orthoreg demo` on that paradigm alone (the text config with the other paradigms
# dropped; every stage's cache key depends only on its own paradigm) into OUT/<paradigm>,
# and moves on. `orthoreg combine OUT/all OUT/full OUT/partial OUT/lora OUT/linear` then
# joins them. With PINNED=DIR set, each paradigm reuses the choices of DIR/<paradigm>'s
# finished run (`--selection-from`): the way further seeds are run after the first.
#
# usage: [PINNED=DIR] bash scripts/text_sweep.sh [OUT=runs/text] [SEEDS=1]
#        (SEEDS: a count, or a YAML list such as '[1,2]'; start one or more workers)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/text}
seeds=${2:-1}
export ORTHOREG_THREADS=${ORTHOREG_THREADS:-1}
mkdir -p "$out/claims" "$out/configs"
for paradigm in full partial lora linear; do
  mkdir "$out/claims/$paradigm" 2>/dev/null || continue
  config=$out/configs/text_$paradigm.yaml
  python - "$paradigm" "$config" <<'EOF'
import sys
import yaml
from orthoreg.cli.commands import builtin_config
paradigm, path = sys.argv[1:]
config = yaml.safe_load(open(builtin_config("text")))
config["paradigms"] = {paradigm: config["paradigms"][paradigm]}
config["name"] = f"text-{paradigm}"
with open(path, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
  if [[ $seeds == \[* ]]; then seed_args=(--set "seeds=$seeds"); else seed_args=(--seeds "$seeds"); fi
  pin_args=()
  if [[ -n ${PINNED:-} ]]; then pin_args=(--selection-from "$PINNED/$paradigm"); fi
  echo "$(date -u +%FT%TZ) text $paradigm, seeds $seeds${PINNED:+, pinned to $PINNED/$paradigm} → $out/$paradigm"
  start=$SECONDS
  orthoreg demo --config "$config" "${seed_args[@]}" "${pin_args[@]}" --no-progress \
    --out "$out/$paradigm"
  echo "$(date -u +%FT%TZ) text $paradigm done in $((SECONDS - start)) s"
done
