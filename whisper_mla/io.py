"""Safe output folders and strict checkpoint loading for the whisper-mla scripts.

Writing. A script that writes a folder (a checkpoint, evaluation results) writes it into a temporary sibling folder
and swaps that in with `os.replace` at the end:

    with atomic_output_dir(output_dir, overwrite=args.overwrite_output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

Whenever the process dies (an exception, Ctrl-C, kill -9), `output_dir` is either as it was or complete; it never
holds a mix of old and new files. With `overwrite=True` the old folder is replaced as a whole, never merged into,
and deleted only after the swap. `check_output_dir` runs the same up-front check on its own, for scripts that want to
refuse a bad `--output_dir` before any expensive work and open the context later. `atomic_checkpoint_files` is the
variant for a checkpoint saved at the top of a folder that keeps other things (a training run's checkpoint-N
folders): config.json goes last, so the folder loads only once the checkpoint is complete. `remove_dir` deletes a
folder without ever leaving a part of it in place.

Loading. `from_pretrained_strict(cls, path)` loads like `cls.from_pretrained(path)` but refuses a checkpoint with
missing, unexpected or wrongly shaped weights, a damaged or truncated safetensors file, or non-finite weights, with one
sentence that names the checkpoint, what is wrong and how to fix it. (transformers would log a warning and fill the
missing weights with random values: a model that loads and transcribes badly.) With `check_only=True` it builds the
model on the meta device, which checks everything but the weight values without reading them: a cheap test of every
input checkpoint before any work. `checkpoint_config(path)` reads config.json with the same kind of message.
"""

import contextlib
import ctypes
import fnmatch
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterator, Sequence


logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: missing, damaged, or not matching its own config."""


def default_cache_dir() -> Path:
    """This project's cache (imported models, speech data, downloads): $WHISPER_MLA_CACHE or ~/.cache/whisper_mla."""
    return Path(os.environ.get("WHISPER_MLA_CACHE") or os.path.join("~", ".cache", "whisper_mla")).expanduser()


# --------------------------------------------------------------------------------------------- writing


def check_output_dir(
    output_dir: str, overwrite: bool = False, *, allowed: Sequence[str] | None = None,
    flag: str = "--overwrite_output_dir",
) -> None:
    """Checks that `output_dir` may be written (by `atomic_output_dir`) before any expensive work.

    Args:
        output_dir: the folder to (re)write; it may not exist yet.
        overwrite: whether a non-empty folder may be replaced as a whole.
        allowed: glob patterns of everything the caller itself writes there (e.g. `["results.json", "*.jsonl"]`).
            With `overwrite`, a folder holding anything else is refused, so that a mistyped `--output_dir` (a model
            folder, a data folder) is not deleted. None: anything may be replaced.
        flag: the command-line flag that sets `overwrite`, named in messages.

    Raises:
        ValueError: with what was expected, what was found, and how to fix it.
    """
    path = os.path.realpath(os.path.expanduser(output_dir))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Expected a folder (or a new path) for --output_dir, but found the file {output_dir!r}; pass a folder "
            "path."
        )
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if entries and not overwrite:
        raise ValueError(
            f"Expected an empty or new --output_dir, but found {_listing(entries)} in {output_dir!r}; pick another "
            f"folder or pass {flag} to replace it."
        )
    cwd = os.path.realpath(os.getcwd())
    if os.path.isdir(path) and os.path.commonpath([cwd, path]) == path:
        raise ValueError(
            f"--output_dir is replaced as a whole when the output is complete, but {output_dir!r} is (or holds) the "
            f"current working folder {cwd!r}; pick an output folder of its own, e.g. a new subfolder."
        )
    if entries:
        if allowed is not None:
            foreign = [entry for entry in entries if not any(fnmatch.fnmatch(entry, p) for p in allowed)]
            if foreign:
                raise ValueError(
                    f"{flag} replaces --output_dir as a whole, so it expects only what this script writes there "
                    f"({', '.join(allowed)}), but found {_listing(foreign)} in {output_dir!r}; move those away or "
                    "pick another folder."
                )
    existing = path
    while not os.path.isdir(existing):  # the nearest folder that exists: the temporary sibling is made under it
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"--output_dir {output_dir!r} must be created in {existing!r}, which is not writable; pick a folder you "
            "can write to."
        )


@contextlib.contextmanager
def atomic_output_dir(
    output_dir: str, overwrite: bool = False, *, allowed: Sequence[str] | None = None,
    flag: str = "--overwrite_output_dir",
) -> Iterator[str]:
    """Yields an empty temporary folder next to `output_dir`; when the block ends without an exception, its content is
    synced to disk and the folder is swapped in as `output_dir` (replacing an old one as a whole).

    The checks of `check_output_dir` (same arguments) run on entry and again just before the swap. On an exception
    nothing is swapped, the temporary folder is deleted and `output_dir` is left as it was. A process killed inside
    the block leaves a hidden `.NAME.tmp-PID-*` sibling behind, which is never loaded; a later call logs it.

    Yields:
        the temporary folder's path, to write everything into.
    """
    check_output_dir(output_dir, overwrite, allowed=allowed, flag=flag)
    target = os.path.realpath(os.path.expanduser(output_dir))
    _log_leftovers(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        yield tmp
        _fsync_tree(tmp)
        check_output_dir(output_dir, overwrite, allowed=allowed, flag=flag)  # nothing else wrote there meanwhile
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: str, target: str) -> None:
    """Moves the folder `source` to `target`, replacing an existing `target` as a whole (never merging).

    On Linux the two folders are exchanged in one atomic step (renameat2 with RENAME_EXCHANGE) and the old one is then
    deleted: `target` is at every instant the complete old or the complete new folder. Where that is not available
    the old `target` is renamed to a hidden sibling first; killed between the two renames, `target` is briefly absent
    and the old folder survives as `.NAME.old-PID-*` (still never a mix). Both must be on one filesystem (siblings are).
    """
    if not os.path.lexists(target):
        os.replace(source, target)
        return
    if os.path.isdir(target) and not os.listdir(target):
        os.rmdir(target)
        os.replace(source, target)
        return
    if _exchange(source, target):
        shutil.rmtree(source, ignore_errors=True)  # now the old folder
        return
    old = _temp_sibling(target, "old")  # an empty folder, which rename(2) may replace
    os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where the C library or the filesystem
    cannot, and nothing was changed."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# What save_pretrained names weights (a Trainer checkpoint's training_args.bin, optimizer.pt, ... are not weights).
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json")
COMMIT_FILE = "config.json"  # without it a folder does not load, so it is removed first and written last


@contextlib.contextmanager
def atomic_checkpoint_files(output_dir: str) -> Iterator[str]:
    """Like `atomic_output_dir`, for a checkpoint saved at the top of a folder that holds other things too (a training
    run's `checkpoint-N` folders, logs), which must stay where they are.

    Yields an empty temporary folder next to `output_dir` to save the checkpoint into. When the block ends without an
    exception, `output_dir/config.json` is removed first, then every saved file is moved in (replacing files of the
    same name; an old checkpoint's other weight files are removed), and config.json last. Killed at any point,
    `output_dir` either lacks config.json (it does not load) or holds the complete new checkpoint: never old weights
    under a new config, or new weights beside stale shards. Everything else in `output_dir` is left alone.

    Yields:
        the temporary folder's path.
    """
    target = os.path.realpath(os.path.expanduser(output_dir))
    os.makedirs(target, exist_ok=True)
    tmp = _temp_sibling(target, "tmp")
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.lexists(os.path.join(target, COMMIT_FILE)):
            os.remove(os.path.join(target, COMMIT_FILE))
        new = set(os.listdir(tmp))
        for name in os.listdir(target):
            if name not in new and any(fnmatch.fnmatch(name, p) for p in WEIGHT_FILES):
                os.remove(os.path.join(target, name))
        for name in sorted(new - {COMMIT_FILE}):
            source, destination = os.path.join(tmp, name), os.path.join(target, name)
            if os.path.isdir(source):
                replace_dir(source, destination)
            else:
                os.replace(source, destination)
        if COMMIT_FILE in new:
            os.replace(os.path.join(tmp, COMMIT_FILE), os.path.join(target, COMMIT_FILE))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, content, **dump_kwargs) -> None:
    """Writes `content` as JSON (`json.dump` with `dump_kwargs`) to a temporary file beside `path`, synced, and swaps
    it in with `os.replace`: a reader (or a run killed mid-write) sees the old file or the new one, never a part.
    Creates the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(content, f, **dump_kwargs)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_dir(path: str) -> None:
    """Deletes a folder so that a kill mid-way never leaves part of it at `path`: it is first renamed to a hidden
    sibling, which is then deleted."""
    path = os.path.realpath(os.path.expanduser(path))
    if not os.path.lexists(path):
        return
    aside = _temp_sibling(path, "old")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _temp_sibling(target: str, kind: str) -> str:
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    return folder


def _log_leftovers(target: str) -> None:
    """Logs hidden siblings left by a killed writer (its process is gone); they are never loaded, only take space."""
    parent, name = os.path.split(target)
    leftovers = []
    for path in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*-*-*")):
        match = re.fullmatch(rf"\.{re.escape(name)}\.(?:tmp|old)-(\d+)-\w+", os.path.basename(path))
        if match and not _process_alive(int(match.group(1))):
            leftovers.append(path)
    if leftovers:
        logger.warning("Found %d folder(s) left by an interrupted write next to %s, which nothing reads: %s; delete "
                       "them to free the space.", len(leftovers), target, ", ".join(sorted(leftovers)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(folder: str) -> None:
    """Flushes every file and folder under `folder` to disk, so the rename that follows publishes complete files even
    after a power loss, not only after a killed process."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


# --------------------------------------------------------------------------------------------- loading


def checkpoint_config(name_or_path: str) -> dict:
    """The config.json of a checkpoint folder or Hub id, as a dict.

    Raises:
        CheckpointError: no such folder, a file instead of a folder, a folder without config.json, an unreadable
            config, or a Hub id that cannot be resolved; the message says which and how to fix it.
    """
    from transformers import PretrainedConfig

    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        raise CheckpointError(
            f"Expected a checkpoint folder (config.json and weights), but found the file {name_or_path!r}; pass the "
            "folder that holds it."
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(
                f"Expected config.json in the checkpoint folder {name_or_path!r}, but found "
                f"{_listing(sorted(os.listdir(path)))}; pass a folder written by save_pretrained or "
                "convert_whisper_to_mla.py."
            )
    elif not _could_be_hub_id(name_or_path):
        raise CheckpointError(
            f"Expected a checkpoint folder or a Hub model id, but no folder exists at {name_or_path!r}; check the path."
        )
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path if os.path.isdir(path) else name_or_path)
    except (OSError, ValueError) as err:
        where = "the folder" if os.path.isdir(path) else "the Hub id (no such local folder either)"
        raise CheckpointError(
            f"Could not read the config of checkpoint {name_or_path!r}: {err}. Check {where}; with no network, "
            "pass a local folder."
        ) from err
    return config_dict


def from_pretrained_strict(model_class, name_or_path: str, *, check_only: bool = False, **kwargs):
    """`model_class.from_pretrained(name_or_path, **kwargs)` that refuses a checkpoint which would load wrong.

    Args:
        model_class: anything with transformers' `from_pretrained`: `AutoModelForSpeechSeq2Seq` (Whisper-MLA
            checkpoints need `trust_remote_code=True` in `kwargs`; the classes then come from the checkpoint's own
            code), `WhisperForConditionalGeneration`, `WhisperMLAForConditionalGeneration`, ...
        name_or_path: a checkpoint folder or Hub id.
        check_only: build the model on the meta device: keys, shapes, the safetensors header and the config are
            checked, no weight is read or allocated. For checking inputs up front.
        **kwargs: passed on (dtype, attn_implementation, config overrides such as mla_cache_quantization, ...).
            Only safetensors weights are read (`use_safetensors=True`): never pickles.

    Returns:
        The model (on the meta device with `check_only`).

    Raises:
        CheckpointError: a missing/unreadable folder or config, a damaged or truncated weights file, weights that are
            missing, unexpected or shaped unlike the config says, or (when loaded) NaN/inf weights; one sentence naming
            the checkpoint, the tensors and the fix.
    """
    from safetensors import SafetensorError

    checkpoint_config(name_or_path)
    kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True, use_safetensors=True)
    if check_only:
        kwargs["device_map"] = "meta"
    try:
        with _without_load_report():
            model, info = model_class.from_pretrained(name_or_path, **kwargs)
    except SafetensorError as err:
        raise CheckpointError(
            f"The weights file of checkpoint {name_or_path!r} is damaged or truncated ({err}); copy or save the "
            "checkpoint again."
        ) from err
    except OSError as err:
        raise CheckpointError(
            f"Could not load the weights of checkpoint {name_or_path!r}: {err}. Expected model.safetensors (or "
            "model-*-of-*.safetensors with their index) next to config.json, as save_pretrained writes them."
        ) from err
    except RuntimeError as err:  # transformers' own verdicts on a state dict; other RuntimeErrors are not ours to word
        if not str(err).startswith(("Error(s) in loading state_dict", "We encountered some issues during automatic")):
            raise
        class_name = getattr(model_class, "__name__", model_class)
        raise CheckpointError(
            f"The weights of checkpoint {name_or_path!r} do not load into {class_name} ({str(err).splitlines()[0]}); "
            "save, convert or copy the checkpoint again."
        ) from err
    _raise_on_loading_problems(name_or_path, type(model).__name__, info)
    if not check_only:
        _check_finite(model, name_or_path)
    return model


class _DropLoadReport(logging.Filter):
    def filter(self, record):
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _without_load_report():
    """transformers logs a multi-line table of missing/unexpected/mismatched keys; every row of it becomes part of
    our one-sentence error instead, so the table is dropped."""
    transformers_logger, report_filter = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
    transformers_logger.addFilter(report_filter)
    try:
        yield
    finally:
        transformers_logger.removeFilter(report_filter)


def _raise_on_loading_problems(name_or_path: str, class_name: str, info: dict) -> None:
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    problems = []
    if missing:
        problems.append(f"lacks {_weights(missing)} that the model needs (transformers would fill in random values)")
    if mismatched:
        shapes = []
        for entry in mismatched[:3]:  # (key, shape in the checkpoint, shape the config implies)
            if isinstance(entry, tuple) and len(entry) == 3:
                key, found, expected = entry
                shapes.append(f"{key}: {tuple(found)} in the file, {tuple(expected)} from config.json")
            else:
                shapes.append(str(entry))
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        problems.append(f"holds {len(mismatched)} weight(s) shaped unlike its config.json says ({'; '.join(shapes)}"
                        f"{more})")
    if unexpected:
        problems.append(f"holds {_weights(unexpected)} that the model has no place for")
    if info.get("error_msgs"):
        problems.append(f"failed to load: {'; '.join(map(str, info['error_msgs']))}")
    if not problems:
        return
    if mismatched:
        fix = ("config.json was changed after the weights were saved (e.g. kv_lora_rank or kept_key_dims edited): "
               "restore the config.json saved with them, or convert the model again with the new setting")
    else:
        fix = "the weights file is incomplete or belongs to another model: save, convert or copy the checkpoint again"
    raise CheckpointError(f"Checkpoint {name_or_path!r} does not match {class_name}: it {'; it '.join(problems)}; "
                          f"{fix}.")


def _check_finite(model, name_or_path: str) -> None:
    import torch

    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(
            f"Checkpoint {name_or_path!r} holds NaN or infinite values in {_weights(bad)}, so everything it outputs "
            "would be garbage; it was saved from a diverged run (e.g. float16 overflow): use an earlier checkpoint."
        )


def _weights(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} weight{'s' if len(names) != 1 else ''} ({shown})"


def _could_be_hub_id(name: str) -> bool:
    # "openai/whisper-small" or "whisper-small"; "./x", "/x", "~/x", "a/b/c" are paths that simply do not exist.
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name))
