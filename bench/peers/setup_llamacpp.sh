#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp's Python binding) from source, CPU only, into
# bench/.venvs/llamacpp, for bench/gguf_llamacpp.py:
#
#     bench/peers/setup_llamacpp.sh
#
# The sdist vendors llama.cpp and compiles it with CMake: about 15-30 minutes on 2 cores.
# The venv sees the system site-packages (numpy); every install is constrained to the system's
# torch version, so nothing here can pull a CUDA torch. No lowbit code runs in this venv: the
# benchmark talks to it through a subprocess and token ids.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=bench/.venvs/llamacpp
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
python3 -m venv --system-site-packages "$venv"
pins=$venv/torch-pin.txt
echo "torch==$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" > "$pins"
# CPU only; no examples, tests or server; native SIMD of this machine (the benchmark runs here)
export CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$pins" \
  --no-binary llama-cpp-python "llama-cpp-python==$version"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "setup_llamacpp.sh: ready in $venv"
