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
    # PyPI has no CPU wheel of llama-cpp-python for Linux, so it is compiled here: once per machine,
    # then reused from the cache by every later clone. The compiler's pages go to a log, not the screen.
    log="${HOME}/.cache/edgetune/llama-cpp-python-build.log"
    mkdir -p "$wheel_dir.part" "$(dirname "$log")"
    echo "edgetune: compiling llama.cpp (llama-cpp-python $LLAMA_VERSION) for this CPU: PyPI has no Linux CPU wheel."
    echo "          This takes about 5-7 minutes on 2 cores and happens once per machine; the wheel is kept in"
    echo "          $wheel_dir. Build log: $log"
    t0=$SECONDS
    if ! CMAKE_ARGS="$LINUX_CMAKE_ARGS" FORCE_CMAKE=1 "${PIP[@]}" wheel --no-deps --no-cache-dir \
        -w "$wheel_dir.part" "llama-cpp-python==$LLAMA_VERSION" >"$log" 2>&1; then
      echo "edgetune: the llama-cpp-python build failed; the last lines of $log:" >&2
      tail -n 25 "$log" >&2
      echo "edgetune: a C/C++ compiler and cmake are needed (Debian/Ubuntu: apt-get install build-essential cmake)." >&2
      exit 1
    fi
    rm -rf "$wheel_dir" && mv "$wheel_dir.part" "$wheel_dir"
    echo "edgetune: llama.cpp compiled in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s"
  else
    echo "edgetune: llama-cpp-python $LLAMA_VERSION from the wheel cache ($wheel_dir)"
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
