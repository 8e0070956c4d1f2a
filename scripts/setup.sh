#!/usr/bin/env bash
# Set up .venv/ at the repository root: torch 2.14.1 + torchvision 0.29.1, timm, transformers, accelerate, lightning,
# galore-torch, oialr (editable, all extras), and, when running as root on Debian, the data packages
# dataset-fashion-mnist and fortunes (the text corpus). Safe to re-run: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {   # pip, minus the notices about local package folders that this machine's pip config prints
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing torch, torchvision and oialr into .venv/ (a few minutes the first time)"
    pip_install torch==2.14.1 torchvision==0.29.1
    pip_install -e ".[cli,vision,lm,hf,lightning,dev]"
    rm -f .venv/.setup-*
    touch "$stamp"
fi

missing=()                                               # Debian data packages: Fashion-MNIST, the text corpus
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -d /usr/share/games/fortunes ] || missing+=(fortunes)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "setup: installing the Debian package(s) ${missing[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
        > /tmp/oialr-apt.log 2>&1; then
        echo "setup: warning: could not install ${missing[*]} (see /tmp/oialr-apt.log);" \
             "Fashion-MNIST or text runs will need --data-dir" >&2
    fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch, oialr; print("torch", torch.__version__, "oialr", oialr.__version__)'))"
