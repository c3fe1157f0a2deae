#!/usr/bin/env bash
# GPU check of engine=vllm (issue 4) on a host with no package index, in one command per side.
#
#   bash bench/vllm_gpu_check.sh prepare     # here (needs the package index): writes .device/{vllm,deps}
#   bash bench/vllm_gpu_check.sh run [args]  # on the GPU host, from the project root with .device/ beside it
#
# .device/vllm: the slim vLLM 0.26 bundle (the newest vLLM built for torch 2.11, Hopper code only, ~36 MiB).
# .device/deps: Hydra/OmegaConf (imported by the engine config) and this project as wheels, so vLLM finds the
#               plugin entry point in its worker processes too (~1 MiB). Polars is not needed by the check.
# `run` passes its arguments to bench/vllm_gpu_check.py (e.g. --results "$OUT/results.jsonl" --commit HASH).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TOOLS="${MTGR_DEVICE_TOOLS:-../shared/device}"   # make_vllm_bundle.py and pack_wheels.py

case "${1:-}" in
  prepare)
    grep -qsx "/.device/" .git/info/exclude || { mkdir -p .git/info; echo "/.device/" >> .git/info/exclude; }
    [ -f .device/vllm/setup.sh ] || python3 "$TOOLS/make_vllm_bundle.py" --out .device/vllm
    rm -rf .device/deps && mkdir -p .device/deps
    python3 "$TOOLS/pack_wheels.py" hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
      --out .device/deps
    python3 -m pip wheel -q --no-deps -w .device/deps .   # the project: its vllm.general_plugins entry point
    du -sh .device/*
    echo "carry .device and run: bash bench/vllm_gpu_check.sh run --commit \$(git rev-parse HEAD)"
    ;;
  run)
    shift
    source .device/vllm/setup.sh
    source .device/deps/install.sh
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .device/deps/*.whl
    export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" PYTHONUNBUFFERED=1
    python3 bench/vllm_gpu_check.py "$@"
    ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
