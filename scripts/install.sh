#!/usr/bin/env bash
# Installs everything whisper-mla needs on a fresh Debian machine (as root): speech data packages from Debian,
# the CPU build of torch, then this project with its data and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -s asterisk-core-sounds-en-g722 flite espeak-ng >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        asterisk-core-sounds-en asterisk-core-sounds-en-g722 flite espeak-ng sox >/dev/null
fi
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
