"""The pseudo-label cache of label-free distillation (--pseudo_label_cache): the teacher's greedy transcripts of the
training clips, kept in a JSON file, `{"format": 1, "entries": {key: [token ids]}}`, and reused by later runs.

A key is a sha256 over everything the labels depend on: the teacher (its weights and generation config), the
settings of the transcription (prompt, generate arguments, feature extractor) and the clip's waveform as the teacher
hears it. Another teacher, setting or waveform (a speed-perturbed copy, a joined sample) misses and is labelled
afresh; nothing is ever looked up by file name. Only labels are kept: encoder outputs are recomputed each run.

Every process that labels clips (data preparation runs on each one of a torchrun job) reads the file and adds its
new labels: under a lock, it re-reads the file, merges, and swaps in a complete new file (`os.replace`), so runs
that share one cache, side by side, neither corrupt it nor drop each other's labels.
"""

import contextlib
import hashlib
import json
import os

import numpy as np
import torch

from whisper_mla.io import write_json_atomic


try:
    import fcntl
except ImportError:  # not POSIX: merged writes stay atomic, but two runs at the same moment may drop one's labels
    fcntl = None


FORMAT = 1
EXPECTED = '--pseudo_label_cache expects a JSON file of pseudo-labels ({"format": 1, "entries": {key: [token ids]}})'
FIX = "delete it if it is a damaged cache (its labels are made again), or point --pseudo_label_cache at another file"


def read_label_cache(path: str) -> dict[str, list[int]]:
    """The entries of the cache file at `path`; {} when there is none yet.

    Raises:
        ValueError: the file is not valid JSON or not a cache of this format; it names what was found and the fix.
    """
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{EXPECTED}, but {path!r} is not valid JSON ({err}); {FIX}.") from err
    except OSError as err:
        raise ValueError(f"{EXPECTED}, but {path!r} cannot be read ({err}); {FIX}.") from err
    if not isinstance(content, dict) or content.get("format") != FORMAT or not isinstance(content.get("entries"), dict):
        found = (f"a JSON {type(content).__name__}" if not isinstance(content, dict) else
                 f"an object with format {content.get('format')!r} and keys {sorted(content)[:5]}")
        raise ValueError(f"{EXPECTED}, but {path!r} holds {found}; {FIX}.")
    entries = content["entries"]
    bad = next((key for key, ids in entries.items()
                if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids))), None)
    if bad is not None:
        raise ValueError(f"{EXPECTED}, but the entry {bad!r} of {path!r} holds {entries[bad]!r}; {FIX}.")
    return entries


def teacher_fingerprint(teacher) -> str:
    """sha256 over the teacher's weights (name, dtype, shape and bytes of every state_dict tensor) and its generation
    config (JSON, all fields): the teacher's identity in the keys."""
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, of any dtype (bfloat16 too)
    digest.update(teacher.generation_config.to_json_string(use_diff=False).encode())
    return digest.hexdigest()


class PseudoLabelCache:
    """The labels of one cache file for one teacher; read when made (a damaged file fails here, before any work).

    Args:
        path: the JSON file; it and its folder are created by the first `add`.
        teacher: the model that transcribes; its fingerprint is taken once, here.
    """

    def __init__(self, path: str, teacher):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.entries = read_label_cache(self.path)
        self.teacher = teacher_fingerprint(teacher)

    def key(self, waveform: np.ndarray, settings: dict) -> str:
        """The key of a clip's labels: sha256 over the teacher's fingerprint, `settings` (whatever else changes the
        labels: prompt, generate arguments, ...; as JSON) and the float32 samples the teacher hears."""
        digest = hashlib.sha256(self.teacher.encode())
        digest.update(json.dumps(settings, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(waveform, dtype=np.float32))
        return digest.hexdigest()

    def add(self, labels: dict[str, list[int]]) -> None:
        """Adds `labels` (key -> ids) to the file: under a lock, merged with what the file holds now (other runs may
        have added labels since it was read), written to a temporary file beside it and swapped in whole."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # for the lock file
        with self._lock():
            self.entries = {**read_label_cache(self.path), **labels}
            write_json_atomic(self.path, {"format": FORMAT, "entries": self.entries}, separators=(",", ":"))

    @contextlib.contextmanager
    def _lock(self):
        """Holds an exclusive lock on `<path>.lock` (the cache file itself is replaced, so it cannot hold one)."""
        if fcntl is None:
            yield
            return
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
