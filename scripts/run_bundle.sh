#!/usr/bin/env bash
# Compile a run's deploy/ bundle against TensorFlow Lite Micro and run it on this host: the
# device program, checked against the class TFLM gave the sample image in Python.
#
#   scripts/run_bundle.sh TFLM_DIR BUNDLE_DIR
#
# TFLM_DIR is a checkout of github.com/tensorflow/tflite-micro. Its reference-kernel library
# is built there first if missing (`make ... microlite`: TFLM's Makefile downloads its third
# party code, ~8 minutes on 2 cores). BUNDLE_DIR is a run's `deploy/` artifact, e.g.
# `mlflow artifacts download -r RUN_ID -a deploy -d .`. Exit status: main.cc's (0 = PASS).
set -euo pipefail
tflm=$(cd "$1" && pwd)
bundle=$2
lib=$tflm/gen/linux_$(uname -m)_default_gcc/lib/libtensorflow-microlite.a
downloads=$tflm/tensorflow/lite/micro/tools/make/downloads
if [ ! -f "$lib" ]; then
  make -C "$tflm" -f tensorflow/lite/micro/tools/make/Makefile -j"$(nproc)" microlite
fi
cd "$bundle"
# TF_LITE_STATIC_MEMORY as the library was built: it changes TfLiteTensor's layout.
g++ -std=c++17 -O2 -DTF_LITE_STATIC_MEMORY -I. -I"$tflm" -I"$downloads/flatbuffers/include" \
  -I"$downloads/gemmlowp" -I"$downloads/kissfft" ./*.cc "$lib" -o main
./main
