#!/usr/bin/env bash
# Create a peer tool's own virtual environment under bench/.venvs/<tool>.
#
#     bench/peers/setup.sh hqq
#     bench/peers/setup.sh llmcompressor
#     bench/peers/setup.sh quanto | torchao | brevitas | autoround
#
# The venv sees the system site-packages, so it reuses the torch (the local CPU wheel),
# transformers and lowbit already installed there. Every install is constrained to that exact
# torch version, so nothing here can pull a CUDA torch or replace the local one.
set -euo pipefail
cd "$(dirname "$0")/../.."
tool=${1:?usage: bench/peers/setup.sh TOOL  (hqq, llmcompressor, quanto, torchao, brevitas, autoround)}
venv=bench/.venvs/$tool
python3 -m venv --system-site-packages "$venv"
# pin the torch the system has, so that no dependency can swap it for another build
pins=$venv/torch-pin.txt
echo "torch==$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" > "$pins"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$pins")
case "$tool" in
  # hqq's setup.py builds CUDA kernels unless DISABLE_CUDA=1; its listed dependencies other
  # than einops and termcolor are already installed with lowbit, so none is upgraded.
  hqq) DISABLE_CUDA=1 "${pip[@]}" --no-deps "hqq==0.2.8.post1" einops termcolor ;;
  # llm-compressor pins its own transformers range, installed inside the venv (it shadows the
  # system's); gguf lets that transformers read SmolLM2's GGUF file.
  llmcompressor) "${pip[@]}" "llmcompressor==0.14.0.1" gguf ;;
  # the others: the pinned requirements in bench/peers/requirements/<tool>.txt
  *) req=bench/peers/requirements/$tool.txt
     [[ -f $req ]] || { echo "setup.sh: unknown peer '$tool' (no $req)" >&2; exit 2; }
     "${pip[@]}" -r "$req" ;;
esac
"$venv/bin/python" -c "import torch; assert not torch.version.cuda or torch.cuda.is_available(), 'CUDA torch on a CPU machine'"
echo "setup.sh: $tool ready in $venv"
