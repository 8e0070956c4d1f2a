#!/usr/bin/env bash
# Set up .venv/, then train the embedded default (MNIST-1D, small CNN) full-rank and with OIALR, and compare them.
# The runs go to runs/default/ (recreated on every call).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=runs/default
rm -rf "$out"
.venv/bin/oialr train --method full-rank --out "$out/full-rank"
.venv/bin/oialr train --method oialr --out "$out/oialr"
echo
.venv/bin/oialr compare "$out/full-rank" "$out/oialr"
