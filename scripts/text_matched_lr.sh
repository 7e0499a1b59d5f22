#!/usr/bin/env bash
# Control for the text benchmark: the baseline at OrthoReg's own learning rate (lr × 1),
# seed 0. The benchmark's protocol gives the baseline a learning-rate choice (× 1, × 3) and
# OrthoReg a λ choice at × 1; this run fixes both to the point OrthoReg chose on seed 0
# (its λ, lr × 1) so that the only difference left is the penalty. Every fine-tune is a
# cached stage of the seed-0 run in TEXT/<paradigm> (gathered first): only the test
# evaluations are new. A control reported beside the benchmark, never a re-selection.
#
# usage: bash scripts/text_matched_lr.sh [OUT=runs/textmatched] [TEXT=runs/text]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/textmatched}
text=${2:-runs/text}
export ORTHOREG_THREADS=${ORTHOREG_THREADS:-1}
for paradigm in partial lora linear full; do
  # OrthoReg's λ as chosen on seed 0 (validation) by the benchmark itself
  lam=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['selection'][sys.argv[2]]['orthoreg']['lambda'])" \
    "$text/$paradigm/results.json" "$paradigm")
  [ -d "$out/$paradigm/stages" ] || orthoreg gather "$out/$paradigm" "$text/$paradigm"
  start=$SECONDS
  orthoreg demo --config "$text/configs/text_$paradigm.yaml" --seeds 1 \
    --set 'selection.lr_multipliers=[1.0]' --set "selection.lambdas=[$lam]" \
    --set "name=text-$paradigm-matched-lr" --no-progress --out "$out/$paradigm"
  echo "$(date -u +%FT%TZ) matched-lr $paradigm (λ = $lam) done in $((SECONDS - start)) s"
done
