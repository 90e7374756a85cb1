"""Writes one manifest alternating the real_train and synthetic_train clips (never an eval set), with absolute paths:
the calibration and training audio of the recovery scripts.

    python benchmarks/mixed_train_manifest.py OUTPUT.json
"""

import argparse
import itertools
import json
import os

from whisper_mla.io import write_json_atomic
from whisper_mla.speech_data import ensure_speech_data


def main(output: str) -> None:
    manifests = ensure_speech_data()
    sets = []
    for name in ("real_train", "synthetic_train"):
        folder = os.path.dirname(manifests[name])
        with open(manifests[name]) as f:
            sets.append([dict(e, path=os.path.join(folder, e["path"])) for e in json.load(f)["annotation"]])
    mixed = [entry for pair in itertools.zip_longest(*sets) for entry in pair if entry]
    write_json_atomic(output, {"annotation": mixed})  # creates the folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the manifest to write, e.g. outputs/train_mixed.json")
    main(parser.parse_args().output)
