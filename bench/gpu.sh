#!/usr/bin/env bash
# vitembed on a CUDA machine, in one short run (about 4 minutes on an H200):
#   model stage bfloat16 / float16 (eager, --compile, a CUDA graph) beside transformers ViTModel,
#   then end to end with every core decoding (640x480 and 4032x3024 JPEGs, exact and --fast-decode).
#     bash bench/gpu.sh                        # output also in $OUT/gpu.txt when $OUT is set
#     bash bench/gpu.sh --quick --device cpu   # smoke run anywhere
# Installs what is missing (plain pip: on a CUDA machine that is the CUDA build of torch) and runs
# vitembed from this checkout (PYTHONPATH), so the machine's own torch stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if ! "$py" -c 'import torch, transformers, PIL, numpy, safetensors, typer, rich, huggingface_hub' 2>/dev/null; then
    "$py" -m pip install -q torch 'transformers>=5' pillow numpy safetensors typer rich huggingface_hub
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
if [ -n "${OUT:-}" ]; then
    "$py" bench/gpu.py "$@" 2>&1 | tee "$OUT/gpu.txt"
else
    "$py" bench/gpu.py "$@"
fi
