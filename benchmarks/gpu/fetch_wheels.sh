#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a GPU session: downloads into .whl/ (git-ignored)
# the wheels that the lent GPU machine's image lacks or holds in too old a version. That
# image has Python 3.12, PyTorch 2.11+cu130, numpy, safetensors, tqdm, tensorboard, onnx,
# onnxruntime, onnxscript, matplotlib, pytest, hypothesis, nanobind, scikit-build-core,
# CMake and ninja, and cannot reach PyPI; benchmarks/gpu/session.sh installs these there.
#
#   bash benchmarks/gpu/fetch_wheels.sh
#
# Versions are the ones this project's .venv runs with (protobuf >= 7.35 is required by the
# modules grpcio-tools generates at build time; google-crc32c frames TFRecords).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "protobuf==7.36.2" "google-crc32c==1.9.0" "grpcio-tools==1.85.1"
ls -l .whl
du -sh .whl
