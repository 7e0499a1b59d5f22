#!/usr/bin/env bash
# The mechanism sweep for one paradigm, end to end, resumable (every stage is cached):
#   1. the default setting, 3 seeds (docs/results/mechanism/mechanism_<paradigm>.yaml);
#   2. rule R2 (scripts/calibrate_mechanism.py --skip-shape): the larger-update multiplier m,
#      from seed-0 single-task validation fine-tunes of the paper form at λ = 1 only;
#   3. the larger-update setting: the same sweep with the paradigm's base lr × m, 3 seeds.
# Each paradigm runs as its own process with one torch thread (two run side by side on a
# 2-core machine); `orthoreg demo --config mechanism[_large]` then gathers their stages.
#
# usage: bash scripts/mechanism_sweep.sh full|lora [OUT=runs/mechanism]
set -euo pipefail
cd "$(dirname "$0")/.."
paradigm=${1:?usage: bash scripts/mechanism_sweep.sh full|lora [OUT]}
out=${2:-runs/mechanism}/$paradigm
config=docs/results/mechanism/mechanism_$paradigm.yaml
calibration=docs/results/mechanism/calibration_large_$paradigm.json
export ORTHOREG_THREADS=${ORTHOREG_THREADS:-1}
[ -f "$config" ] || { echo "mechanism_sweep: no $config" >&2; exit 2; }
stamp() { date -u +%FT%TZ; }

echo "$(stamp) default sweep: $config, 3 seeds → $out/default"
start=$SECONDS
orthoreg demo --config "$config" --seeds 3 --out "$out/default"
echo "$(stamp) default sweep done in $((SECONDS - start)) s"

start=$SECONDS
if [ ! -f "$calibration" ]; then
  python scripts/calibrate_mechanism.py --out "$out" --paradigms "$paradigm" --skip-shape \
    --json "$calibration"
fi
echo "$(stamp) rule R2 done in $((SECONDS - start)) s"
lr=$(python - "$calibration" "$config" "$paradigm" <<'EOF'
import json, sys
import yaml
calibration, config, paradigm = sys.argv[1:]
m = json.load(open(calibration))["paradigms"][paradigm]["large_update"]["multiplier"]
print(yaml.safe_load(open(config))["paradigms"][paradigm]["lr"] * m)
EOF
)
echo "$(stamp) larger-update sweep: lr $lr, 3 seeds → $out/large"
start=$SECONDS
orthoreg demo --config "$config" --seeds 3 --set "paradigms.$paradigm.lr=$lr" \
  --set "name=mechanism-$paradigm-large" --out "$out/large"
echo "$(stamp) larger-update sweep done in $((SECONDS - start)) s"
