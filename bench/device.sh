#!/usr/bin/env bash
# Run the project on a GPU host that has Python 3.12 and CUDA torch but no package index (see bench/RESULTS.md).
#
#   bash bench/device.sh prepare         # here, with the package index: writes .device/{vllm,deps}
#   bash bench/device.sh stage           # there, call 1 (carry .device/deps): unpacks the wheels into /tmp/site
#   bash bench/device.sh bench [k=v ..]  # there, call 2 (carry .device/vllm): python -m batch.bench k=v ..
#   bash bench/device.sh exec CMD ..     # there, call 2: any command with the same environment
#
# .device/vllm: the slim vLLM 0.26 bundle (the newest vLLM built for torch 2.11, Hopper code only, ~36 MiB).
# .device/deps: Polars, Hydra/OmegaConf, fsspec and this project as Python 3.12 wheels (~28 MiB; the project
#               wheel carries the vllm.general_plugins entry point that vLLM's worker processes look up).
# Both together exceed what one call may carry (64 MiB), so they travel in two calls made back to back: /tmp of
# a warm host survives between calls. `bench` refuses to start if the host was replaced in between.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TOOLS="${MTGR_DEVICE_TOOLS:-../shared/device}"   # make_vllm_bundle.py and pack_wheels.py
SITE=/tmp/site

case "${1:-}" in
  prepare)
    grep -qsx "/.device/" .git/info/exclude || { mkdir -p .git/info; echo "/.device/" >> .git/info/exclude; }
    [ -f .device/vllm/setup.sh ] || python3 "$TOOLS/make_vllm_bundle.py" --out .device/vllm
    rm -rf .device/deps && mkdir -p .device/deps
    python3 "$TOOLS/pack_wheels.py" polars==2.1.0 polars-runtime-32==2.1.0 hydra-core==1.3.8 omegaconf==2.3.1 \
      antlr4-python3-runtime==4.9.3 fsspec==2026.9.0 --out .device/deps
    python3 -m pip wheel -q --no-deps -w .device/deps .
    du -sh .device/*
    echo "call 1: carry [.device/deps], command: bash bench/device.sh stage"
    echo "call 2 (right after): carry [.device/vllm], command: bash bench/device.sh bench [key=value ...]"
    ;;
  stage)
    source .device/deps/install.sh
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .device/deps/*.whl
    python3 -c "import polars, hydra, batch" && touch "$SITE/.ok-deps" && echo "staged into $SITE"
    ;;
  bench|exec)
    what="$1"; shift
    [ -f "$SITE/.ok-deps" ] || { echo "no $SITE/.ok-deps: the host was replaced; run 'stage' again first" >&2; exit 3; }
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    source .device/vllm/setup.sh
    export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" PYTHONUNBUFFERED=1
    if [ "$what" = bench ]; then exec python3 -m batch.bench "$@"; else exec "$@"; fi
    ;;
  *)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
