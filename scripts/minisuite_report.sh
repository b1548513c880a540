#!/usr/bin/env bash
# Every number of the README's "Results on the mini-suite", from command output only.
#   bash scripts/minisuite_report.sh [OUT]     (hours on 2 CPU cores; resumes where it stopped)
# Studies and logs go to OUT (default ./minisuite-report); the store is $TVDIAG_STORE or ~/.cache/tvdiag.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
D=${DIAG:-"$REPO/.venv/bin/diag"}
OUT=${1:-minisuite-report}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
Q="--quiet"
# 1. the zoo: three training seeds, both θ_ft* variants (α = 0.8), then α = 0.5 and 0.95 (paper) for seeds 0 and 1
$D zoo --seeds 0 1 2 --variant paper --variant from-ft $Q
$D zoo --seeds 0 1 --variant paper --alpha 0.5 --alpha 0.95 $Q
# 2. the all-pairs study: every ordered pair on the λ2 grid (λ2 chosen on val), both variants, three seeds
for V in paper from-ft; do
  $D study --seeds 0 1 2 --variant $V --lambda-grid --no-curvature --out "$OUT/allpairs" $Q > "$OUT/study-$V.txt"
  for s in 0 1 2; do
    $D correlate --study "$OUT/allpairs" --variant $V --train-seed $s $Q > "$OUT/correlate-$V-s$s.txt"
    $D rank-sources --evaluate --study "$OUT/allpairs" --variant $V --train-seed $s $Q > "$OUT/loto-$V-s$s.txt"
  done
  $D rank-sources --coverage --study "$OUT/allpairs" --variant $V $Q > "$OUT/coverage-$V.txt"
done
# 2b. the predictions: the all-pairs study with curvature (exact, card and diagonal risks, gᵀτ) on the λ2 grid —
#     the committed results/paper-grid-s012 —, the loss model with g and H on train vs held-out images, and the
#     ranking's intervals on domains outside the study
$D study --seeds 0 1 2 --variant paper --lambda-grid --out "$OUT/allpairs-curv" $Q > "$OUT/study-curv.txt"
$D rank-sources --coverage --study "$OUT/allpairs-curv" --variant paper $Q > "$OUT/coverage-curv.txt"
PY=${PY:-"$REPO/.venv/bin/python"}
STORE=${TVDIAG_STORE:-"$HOME/.cache/tvdiag"}
$PY "$REPO/scripts/loss_model_check.py" --store "$STORE" --seeds 0 1 2 --out "$OUT/loss-model" > "$OUT/loss-model.txt"
$PY "$REPO/scripts/outside_domains.py" --study "$OUT/allpairs-curv" --out "$OUT/outside" > "$OUT/outside.txt"
$D ceilings --seeds 0 1 2 --variant paper --ks-samples 160 $Q > "$OUT/ceilings-paper.txt"
$D ceilings --seeds 0 1 2 --variant from-ft $Q > "$OUT/ceilings-from-ft.txt"
# 3. α = 0.5 and 0.95 (paper variant) at λ2 = 0.7
for A in 0.5 0.95; do
  $D study --seeds 0 1 --variant paper --alpha $A --no-curvature --out "$OUT/alpha$A" $Q > "$OUT/study-alpha$A.txt"
done
# 4. the method study: every method on every pair (knobs chosen on val), the trade-off figure and the goals
$D study --seeds 0 1 2 --methods plain project precondition blocks mix mix-ranked mix-matched mix-ranked-matched --out "$OUT/methods" $Q > "$OUT/study-methods.txt"
$D study --seeds 0 1 2 --variant from-ft --methods plain project precondition blocks mix mix-ranked mix-matched mix-ranked-matched --out "$OUT/methods-fromft" $Q \
  > "$OUT/study-methods-fromft.txt"
# 5. the all-pairs study at the preprint's Kernel SHAP density (160 samples per image at M = 16), seeds 0 and 1, both variants
$D zoo --preset dense --seeds 0 1 --variant paper --variant from-ft $Q
for V in paper from-ft; do
  $D study --preset dense --seeds 0 1 --variant $V --lambda-grid --no-curvature --out "$OUT/allpairs-dense" $Q \
    > "$OUT/study-dense-$V.txt"
done
# 6. from-ft at the paper variant's step (seed 0), and the full-seed axis: θ_base and the splits reseeded,
#    one store per full seed (full seed 0 is the store above), training seed 0, λ2 = 0.7
$PY "$REPO/scripts/equal_norm.py" --store "$STORE" --out "$OUT/from-ft-equal-norm" > "$OUT/equal-norm.txt"
for F in 1 2; do
  TVDIAG_STORE="$STORE-full$F" TVDIAG_BASE_SEED=$F TVDIAG_SPLIT_SEED=$F $D zoo --seeds 0 $Q
  TVDIAG_STORE="$STORE-full$F" TVDIAG_BASE_SEED=$F TVDIAG_SPLIT_SEED=$F $D study --seeds 0 --no-curvature \
    --out "$OUT/full$F" $Q > "$OUT/study-full$F.txt"
done
$PY "$REPO/scripts/full_seeds.py" --out "$OUT/full-seeds" 0="$OUT/allpairs-curv" 1="$OUT/full1" 2="$OUT/full2"
echo "report in $OUT"
