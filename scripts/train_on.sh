#!/usr/bin/env bash
# Train on (issue 20): continue training the product model in the background, niced, so that idle CPU
# hours become a better bundled model. Survives the end of the shell that started it (nohup).
#
#   bash scripts/train_on.sh [MINUTES] [OUT]        # defaults: 240 minutes, runs/train_on
#
# Starts from OUT/checkpoint.safetensors when there is one (resume: optimiser, EMA and step kept), else
# from the bundled weights with a fresh optimiser and a short warm-up (--init), with the product recipe
# Resources/Configs/iris-small.yaml. Packs the training data (and 24 real registrations per collection) first if
# .cache/packed lacks them. Writes a
# checkpoint and exports OUT/model every CHECKPOINT_MINUTES (default 5); the log goes to OUT.log. One torch thread
# (THREADS): on a CPU shared with other work, several threads wait for each other at every operation.
# Timings: the run registers itself (IrisSegmentLib/training/pause.py) and the benchmarks that time
# something (speed, memory, batch, wholescan seconds) stop it while they measure and let it go on after.
# Stop it: kill $(cat /tmp/iris-segment-training.pid)   (a checkpoint of at most CHECKPOINT_MINUTES ago stays)
# Keep its weights only when the whole-scan table says they are better (docs/TRAINING.md: the keep rule, the ledger).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-240}
OUT=${2:-runs/train_on}
DATA=${DATA:-.cache/packed}
CHECKPOINT_MINUTES=${CHECKPOINT_MINUTES:-5}
THREADS=${THREADS:-1}
mkdir -p "$OUT"
if [ ! -f "$DATA/registrations.json" ]; then  # packs what is missing: the cases, real registration priors (issue 17)
    iris-segment pack --source ../shared/data --out "$DATA" --registrations 24
fi
if [ -f "$OUT/checkpoint.safetensors" ]; then
    START=(--resume "$OUT/checkpoint.safetensors")
else
    START=(--init Resources/Models/iris-small)
fi
nohup nice -n 10 iris-segment train --config Resources/Configs/iris-small.yaml --data "$DATA" --minutes "$MINUTES" \
    --out "$OUT" "${START[@]}" --checkpoint-minutes "$CHECKPOINT_MINUTES" --threads "$THREADS" >> "$OUT.log" 2>&1 < /dev/null &
echo "training in the background: pid $!, ${START[*]}, log $OUT.log, model folder $OUT/model"
