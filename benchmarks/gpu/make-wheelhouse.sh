#!/usr/bin/env bash
# Build a folder of wheels for a GPU machine that reaches no package registry.
# For an image that already has Python 3.12, torch, transformers (too old for gptqmodel), accelerate,
# triton, an older Typer and rich: this adds the GPTQ stack, pydantic, tomlkit and Typer 0.29 (which
# the CLI imports) and the server's FastAPI, uvicorn and openai (its tests' client), llguidance
# (answer formats), jsonschema and pytest (the GPU tests). transformers stays below 5.25, which
# needs a newer huggingface-hub than such images carry. Run it where pip works; copy the folder over.
#   usage: make-wheelhouse.sh [OUT_DIR] [RAY_DIR]   (default: .wheelhouse, about 32 MB)
# With RAY_DIR it also writes RAY_DIR/ray.tar.xz (about 30 MB), for bench_ray.py: Ray's wheel without
# what personas never imports (Java jars, RLlib, Serve, Data, Tune, Train, its LLM library) and
# recompressed, for machines that receive files in small loads (the whole wheel is 79 MB); unpack it
# into the site folder, as install-on-device.sh does when it finds it.
set -euo pipefail
out=${1:-.wheelhouse}
mkdir -p "$out"
tmp=$(mktemp -d)
dl() { pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$out" "$@"; }
dl "transformers>=5.20.2,<5.25" optimum==2.3.0 datasets dill multiprocess torchao gguf pydantic pydantic-core typing-inspection annotated-types \
  tomlkit "typer>=0.29,<0.30" annotated-doc fastapi starlette uvicorn openai jiter distro sniffio httpx2 httpcore2 truststore \
  jsonschema jsonschema-specifications referencing rpds-py attrs \
  pytest pluggy iniconfig packaging pygments
# answer formats: llguidance's one abi3 wheel is built for glibc 2.31 and later
pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux_2_31_x86_64 -d "$out" "llguidance>=1.9"
# pure-python sdists: turn them into wheels here
pip download -q --no-deps --no-binary gptqmodel,logbar,tokenicer,device-smi,defuser -d "$tmp" gptqmodel==7.7.0 logbar tokenicer device-smi defuser
for s in "$tmp"/*.tar.gz; do pip wheel -q --no-deps --no-build-isolation -w "$out" "$s" 2>/dev/null || pip wheel -q --no-deps -w "$out" "$s"; done
# pypcre has C code and no wheel on the registry: it is built on the GPU machine by install-on-device.sh
# (--no-binary for pypcre alone: with ':all:' pip would also build its build tools, CMake included, from source)
pip download -q --no-deps --no-binary pypcre -d "$out" pypcre
if [ -n "${2:-}" ]; then
  mkdir -p "$2" "$tmp/ray"
  ray_dir=$(cd "$2" && pwd)  # absolute: the archive is written from inside the unpacked wheel
  pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 -d "$tmp" "ray==2.60.0"
  # Ray's compiled dependencies, installed there only where the image lacks them
  pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 -d "$ray_dir" msgpack protobuf
  # unpacked with each file's mode: Ray's servers (gcs_server, raylet) must stay executable
  python3 -c 'import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        if info.external_attr >> 16:
            os.chmod(path, info.external_attr >> 16 & 0o777)' "$tmp"/ray-*.whl "$tmp/ray"
  (cd "$tmp/ray" && rm -rf ray/jars ray/rllib ray/serve ray/data ray/tune ray/train ray/llm ray/workflow \
    && tar cf - ray ray-*.dist-info | xz -T0 -6 > "$ray_dir/ray.tar.xz")
  ls -la "$ray_dir"
fi
rm -rf "$tmp"
ls -la "$out"
