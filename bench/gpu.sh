#!/usr/bin/env bash
# vitembed on a CUDA machine, in one short run (about 4 minutes on an H200):
#   model stage bfloat16 / float16 (eager, --compile, a CUDA graph) beside transformers ViTModel,
#   then end to end with every core decoding (640x480 and 4032x3024 JPEGs, exact and --fast-decode).
#     bash bench/gpu.sh                        # output also in $OUT/gpu.txt when $OUT is set
#     bash bench/gpu.sh --quick --device cpu   # smoke run anywhere
# Runs vitembed from this checkout (PYTHONPATH) with $PYTHON (default python3), so the machine's own
# torch stays as it is. On a CUDA machine (nvidia-smi works) it installs what that Python lacks
# (plain pip: the CUDA build of torch); elsewhere it only says what is missing, e.g. use
#     PYTHON=.venv/bin/python bash bench/gpu.sh --quick --device cpu --no-compile
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if ! "$py" -c 'import torch, transformers, PIL, numpy, safetensors, typer, rich, huggingface_hub' 2>/dev/null; then
    if ! nvidia-smi >/dev/null 2>&1; then
        echo "gpu.sh: $py lacks torch, transformers or vitembed's other packages, and this is no CUDA machine:" \
             "install them, or set PYTHON=.venv/bin/python" >&2
        exit 2
    fi
    "$py" -m pip install -q torch 'transformers>=5' pillow numpy safetensors typer rich huggingface_hub
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
if [ -n "${OUT:-}" ]; then
    "$py" bench/gpu.py "$@" 2>&1 | tee "$OUT/gpu.txt"
else
    "$py" bench/gpu.py "$@"
fi
