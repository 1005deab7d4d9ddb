#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the locked versions.
# Idempotent: returns at once when nothing it depends on has changed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml constraints.txt setup.sh | sha256sum | cut -c1-32)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import imagegen" 2>/dev/null; then
  exit 0
fi
echo "setup: creating .venv with locked versions (constraints.txt)" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,spark]"
# RapidOCR (the OCR filter; its ONNX models ship in the wheel) without its opencv-python requirement:
# cv2 comes from opencv-python-headless, and a second cv2 build would overwrite it
.venv/bin/python -m pip install -q -c constraints.txt --no-deps rapidocr-onnxruntime
# invisible-watermark (dwtDct watermarks of imagegen sample) likewise asks for opencv-python
.venv/bin/python -m pip install -q -c constraints.txt --no-deps invisible-watermark
.venv/bin/python -c "import rapidocr_onnxruntime, nudenet, cv2, imwatermark"
# img2dataset pulls the old 'dataclasses' backport, which shadows the standard module and kills
# Prefect's server process ("dataclass() got an unexpected keyword argument 'slots'").
.venv/bin/python -m pip uninstall -q -y dataclasses 2>/dev/null || true
.venv/bin/python -c "import dataclasses, sys; assert 'site-packages' not in (dataclasses.__file__ or ''), dataclasses.__file__"
echo "$want" > "$stamp"
echo "setup: done" >&2
