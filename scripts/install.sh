#!/usr/bin/env bash
# Create .venv and install edgetune with what this platform needs.
#   scripts/install.sh           runtime (what `make demo` needs)
#   scripts/install.sh dev       + test tools (what `make test` needs)
# Linux x86-64: torch==2.13.0 (the CPU build this machine class keeps on local disk; an unpinned
#   torch pulls a multi-GB CUDA build) and llama-cpp-python built with explicit CPU flags: the
#   default native build crashes (SIGSEGV in ggml_backend_amx_mul_mat) on batched prompts here.
#   The built wheel is cached under ~/.cache/edgetune/wheels, keyed by version and flags.
# macOS arm64: mlx + mlx-lm and the default (Metal) llama.cpp build.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-runtime}"
PY="${PYTHON:-python3}"
VENV=.venv
LLAMA_VERSION=0.3.36
LINUX_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"

os="$(uname -s)"; arch="$(uname -m)"
stamp_src="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.edgetune-$MODE-$stamp_src"
if [ -f "$stamp" ]; then
  echo "edgetune: $VENV is up to date ($MODE)"; exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

extras=""
if [ "$os" = "Linux" ] && [ "$arch" = "x86_64" ]; then
  "${PIP[@]}" install -q "torch==2.13.0"
  flags_hash="$(echo "$LINUX_CMAKE_ARGS" | sha256sum | cut -c1-12)"
  wheel_dir="${HOME}/.cache/edgetune/wheels/llama-cpp-python-$LLAMA_VERSION-$flags_hash"
  if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "edgetune: building llama-cpp-python $LLAMA_VERSION for this CPU (about 5 minutes, once)…"
    mkdir -p "$wheel_dir.part"
    CMAKE_ARGS="$LINUX_CMAKE_ARGS" FORCE_CMAKE=1 "${PIP[@]}" wheel -q --no-deps --no-cache-dir \
      -w "$wheel_dir.part" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$wheel_dir" && mv "$wheel_dir.part" "$wheel_dir"
  fi
  "${PIP[@]}" install -q "$wheel_dir"/llama_cpp_python-*.whl
  extras="torch,mlxcpu"
elif [ "$os" = "Darwin" ] && [ "$arch" = "arm64" ]; then
  extras="torch,mlx"
else
  extras="torch"
fi
[ "$MODE" = "dev" ] && extras="$extras,dev"

"${PIP[@]}" install -q -e ".[$extras]"
rm -f "$VENV"/.edgetune-"$MODE"-*
touch "$stamp"
echo "edgetune: installed into $VENV with extras [$extras]"
