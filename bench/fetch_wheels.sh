#!/usr/bin/env bash
# Download, on a machine WITH network, the wheels the GPU machine lacks (it has no network), into
# the git-ignored folder wheels/; the device tool's `carry: ["wheels"]` sends them along and
# bench/run_gpu.sh installs them with `pip install --no-index --no-deps --target DIR`.
#
#   bash bench/fetch_wheels.sh [PYTHON_VERSION]      # default 3.12 (the GPU machine's Python)
#
# Only pure-Python or manylinux wheels for that Python, no dependencies (the GPU image has torch,
# numpy, triton; pulling their requirements would replace them).
#   spikingjelly 2.0.0   baselines: multi-step LIFNode, FlexSN (bench/test_bench_neuron.py)
#   loguru               imported by SpikingJelly 2.0
#   mnist1d              the MNIST-1D data set generator (data/training benchmarks)
# The GPU image already holds what these import (scipy, requests, tqdm) and safetensors (its
# package list, read 2026-11): carrying them again would shadow its builds. Under 2 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-python3}
mkdir -p wheels
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYV" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d wheels spikingjelly==2.0.0 loguru mnist1d
ls -l wheels
du -sh wheels
