#!/usr/bin/env bash
# One GPU training round (issue 3): start from the bundled model, train on the travel cache for a
# time budget, and leave the exported model folder in $OUT, the folder that comes back.
#
# Here, once (needs .cache/packed from `iris-segment pack --source ../shared/data --out .cache/packed`):
#   iris-segment pack --travel .cache/packed --out .cache/travel     # 31.5 MiB; .cache/ is git-ignored
#   mkdir -p .cache/pylib/yaml && cp "$(python -c 'import os, yaml; print(os.path.dirname(yaml.__file__))')"/*.py .cache/pylib/yaml/
#     PyYAML (the configs' only parser) as its pure-Python modules, ~0.2 MiB: the device machine may lack PyYAML and
#     reaches no package index, and these import on any Python 3 there without pip or a build (no compiled _yaml,
#     which is tied to one Python version; PyYAML then uses its own Python parser). Used only where
#     `import yaml` fails there.
# The device call (the only one; the machine's start is extra):
#   run(command="bash scripts/gpu_train.sh", carry=[".cache/travel", ".cache/pylib"], timeout_s=600)
#   MINUTES counts from the start of the train command (data loading included); validation and the
#   final export take well under a minute after it, so 8.3 fits the 600 s limit.
# What comes back (5 files, each under 16 MiB): train.log (stdout), log.jsonl (loss every 10
#   steps, speed after the first minute, final validation Dice), model/config.yaml,
#   model/weights.safetensors, model/memory_bank.safetensors. model/ is rewritten every
#   CHECKPOINT_MINUTES, so a run killed at the limit still returns the last export. The resume
#   checkpoint (~120 MB for iris-small) stays in RESUME_DIR on the device machine.
# Bring it in: validate the returned folder here on the CPU (README, "How well it does", with
#   --model <files_at>/model); only if it beats the bundled model:
#   cp <files_at>/model/{config.yaml,weights.safetensors,memory_bank.safetensors} Resources/Models/iris-small/
#   and update the model card (GPU minutes, steps and batch from log.jsonl and train.log).
# Check it on the CPU first, same script:
#   OUT=/tmp/out DEVICE=cpu WORKERS=1 MINUTES=1 BATCH=2 BANK_CROPS=1 bash scripts/gpu_train.sh
set -euo pipefail
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-14}
MINUTES=${MINUTES:-8.3}
BATCH=${BATCH:-16}
INIT=${INIT:-Resources/Models/iris-small}
CONFIG=${CONFIG:-Resources/Configs/iris-small.yaml}  # the product recipe (prior input and episodes of issue 17)
DATA=${DATA:-.cache/travel}
RESUME_DIR=${RESUME_DIR:-/tmp/iris-resume}
CHECKPOINT_MINUTES=${CHECKPOINT_MINUTES:-2}
BANK_CROPS=${BANK_CROPS:-4}
PYLIB=${PYLIB:-.cache/pylib}  # the carried pure-Python PyYAML (see above)

mkdir -p "$OUT"
PYTHONPATH=.
if ! python3 -c "import yaml" 2>/dev/null; then  # no PyYAML installed here: the carried one
    if [ ! -f "$PYLIB/yaml/__init__.py" ]; then
        echo "error: no PyYAML on this machine and none in $PYLIB: make and carry it (this script's header)" >&2
        exit 1
    fi
    PYTHONPATH=".:$PYLIB"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH
python3 -m IrisSegmentLib.cli train --config "$CONFIG" --init "$INIT" --data "$DATA" --minutes "$MINUTES" --device "$DEVICE" \
    --workers "$WORKERS" --batch-size "$BATCH" --out "$OUT" --resume-dir "$RESUME_DIR" \
    --checkpoint-minutes "$CHECKPOINT_MINUTES" --bank-crops "$BANK_CROPS" 2>&1 | tee "$OUT/train.log"
