#!/usr/bin/env bash
# Download (and, for DeepSpeed, build) the wheels the GPU machine lacks, for its Python 3.12 x86-64, into
# bench/gpu_wheels/ (git-ignored; carry it: run(command="bash bench/gpu_check.sh", carry=["bench/gpu_wheels"])).
# The GPU image has torch 2.11 and triton 3.6 but no deepspeed, webdataset or liger-kernel (see GPU-NOTES).
# DeepSpeed 0.19.8 ships only as an sdist, and an unpinned `pip download --only-binary` silently picks deepspeed
# 0.3.1.dev5: it is built here into a pure-Python wheel with no ops prebuilt (they build at run time if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-bench/gpu_wheels}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
if ! ls "$DEST"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
fi
PINS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_extensions==4.16.0
      typing_inspection==0.4.5 hjson==3.1.0 msgpack==1.2.4 einops==0.8.2 psutil==7.2.2 py-cpuinfo==9.0.0
      ninja==1.13.2 packaging==26.4 webdataset==1.0.2 braceexpand==0.1.7 liger-kernel==0.7.0)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${PINS[@]}"
du -sh "$DEST"
ls -1 "$DEST"
