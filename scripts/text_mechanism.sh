#!/usr/bin/env bash
# The mechanism forms on the text benchmark, for one paradigm, end to end and resumable:
#   1. the config: the text benchmark (orthoreg/configs/text.yaml) with this paradigm only,
#      plus the forms in FORMS (default "growth shape") and the norm-matched addition of the
#      image sweep (docs/results/text/mechanism/mechanism_<paradigm>.yaml). ξ is off: over
#      8 tasks it is 28 pairs × 25 α points, ≈ 20 CPU-minutes per (variant, seed) here;
#   2. if FORMS has shape: rule R1 (scripts/calibrate_mechanism.py --skip-large) fixes the
#      shape form's λ grid from seed-0 single-task VALIDATION fine-tunes (32 of them), before
#      any addition result;
#   3. the finished text stages of this paradigm (seed 0 in TEXT/<paradigm>, gathered before
#      R1; seeds 1-2 in TEXT12/<paradigm>, waited for and gathered before the sweep), so
#      baseline and OrthoReg are not trained again;
#   4. `orthoreg demo` on 3 seeds (seed 0 chooses, as everywhere).
#
# usage: [FORMS="growth shape"] bash scripts/text_mechanism.sh full|lora [OUT=runs/textmech]
#        [TEXT=runs/text] [TEXT12=runs/text12]
set -euo pipefail
cd "$(dirname "$0")/.."
paradigm=${1:?usage: bash scripts/text_mechanism.sh full|lora [OUT] [TEXT] [TEXT12]}
out=${2:-runs/textmech}/$paradigm
text=${3:-runs/text}
text12=${4:-runs/text12}
dir=docs/results/text/mechanism
config=$dir/mechanism_$paradigm.yaml
calibration=$dir/calibration_$paradigm.json
forms=${FORMS:-growth shape}
export ORTHOREG_THREADS=${ORTHOREG_THREADS:-1}
stamp() { date -u +%FT%TZ; }
mkdir -p "$dir" "$out"

if [ ! -f "$config" ]; then
  python - "$paradigm" "$config" "$forms" <<'EOF'
import sys
import yaml
from orthoreg.cli.commands import builtin_config
paradigm, path, forms = sys.argv[1:]
config = yaml.safe_load(open(builtin_config("text")))
config["name"] = f"text-mechanism-{paradigm}"
config["paradigms"] = {paradigm: config["paradigms"][paradigm]}
# shape: a placeholder until rule R1 writes its grid; growth: the paper form's λ grid
grids = {"growth": list(config["selection"]["lambdas"]), "shape": [0.001, 0.01]}
config["selection"]["forms"] = {form: grids[form] for form in forms.split()}
config["mechanism"] = {"norm_matched": True, "xi": False}
config["seeds"] = [0]
with open(path, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
fi

if [ -d "$text/$paradigm/stages" ]; then orthoreg gather "$out/default" "$text/$paradigm"; fi
start=$SECONDS
if [[ " $forms " == *" shape "* ]]; then
if [ ! -f "$calibration" ]; then
  echo "$(stamp) rule R1 for $paradigm → $calibration"
  python scripts/calibrate_mechanism.py --config "$config" --out "$out" --paradigms "$paradigm" \
    --skip-large --json "$calibration"
fi
python - "$calibration" "$config" "$paradigm" <<'EOF'
import json
import sys
import yaml
calibration, path, paradigm = sys.argv[1:]
grid = json.load(open(calibration))["paradigms"][paradigm]["shape"]["grid"]
config = yaml.safe_load(open(path))
if config["selection"]["forms"]["shape"] != grid:
    config["selection"]["forms"]["shape"] = grid
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
print(f"shape grid (rule R1): {grid}")
EOF
echo "$(stamp) rule R1 done in $((SECONDS - start)) s"
fi

if [ -d "$text12/$paradigm" ]; then
  until [ -f "$text12/$paradigm/results.json" ]; do
    echo "$(stamp) waiting for $text12/$paradigm to finish"; sleep 120
  done
  orthoreg gather "$out/default" "$text12/$paradigm"
fi

echo "$(stamp) text mechanism sweep: $config, 3 seeds → $out/default"
start=$SECONDS
orthoreg demo --config "$config" --seeds 3 --no-progress --out "$out/default"
echo "$(stamp) text mechanism sweep done in $((SECONDS - start)) s"
