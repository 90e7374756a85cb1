"""Builders the tests share: tiny random Whisper models with a processor and generation config laid out like tiny.en's
(the same token ids, built here from a small vocabulary: no real weights needed), test audio and manifests, and one
way to run code or a script in a fresh interpreter.

conftest.py turns the model builders into fixtures (`tiny_mha`, `tiny_processor`, `tiny_checkpoint_dirs`, ...).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import soundfile
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING_RATE = 16000

# OpenAI's English-only vocabulary (tiny.en), which the tiny tokenizer reproduces id for id.
EOT, SOT, PREV_SOT, NO_TIMESTAMPS, FIRST_TIMESTAMP = 50256, 50257, 50360, 50362, 50363
VOCAB_SIZE = 51864  # 50256 text tokens, <|endoftext|>, 106 special tokens, 1501 timestamps
NUM_LANGUAGES = 99  # language tokens of the English-only vocabulary (unused by it, but they hold their ids)
# Words the tiny tokenizer encodes as one token each (with and without a leading space): the transcripts the tests
# train on stay a few tokens long, as with a real vocabulary (run_finetune drops labels over --max_label_length).
WORDS = (
    "a all and are audio brown busy cat circuits clip currently conference damaged first fox good hello in is lost mat "
    "morning no now on one only person quick sat second the third this three to two testing utterance world you"
).split()


# --------------------------------------------------------------------------------------------- tiny Whisper


def tiny_whisper_config(**overrides):
    """A Whisper config small enough for CPU tests in seconds, with tiny.en's vocabulary size and special tokens."""
    from transformers import WhisperConfig

    kwargs = dict(
        vocab_size=VOCAB_SIZE, num_mel_bins=80, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=SOT, pad_token_id=EOT, bos_token_id=EOT, eos_token_id=EOT,
        begin_suppress_tokens=[220, EOT], suppress_tokens=[],
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def tiny_generation_config():
    """tiny.en's generation settings (English-only, timestamps after <|notimestamps|>) for the 2-layer tiny model:
    64 decoder positions, alignment heads in its last layer."""
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, max_length=64,
        begin_suppress_tokens=[220, EOT], suppress_tokens=[1, 2, 7, 8, 9, 10, 14, 25],
        no_timestamps_token_id=NO_TIMESTAMPS, prev_sot_token_id=PREV_SOT, max_initial_timestamp_index=50,
        return_timestamps=False, is_multilingual=False, forced_decoder_ids=None, alignment_heads=[[1, 0], [1, 1]],
    )


def random_whisper(config, seed: int = 0):
    """A WhisperForConditionalGeneration with random weights drawn from `seed`, in eval mode."""
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(config).eval()


def tiny_whisper_model(seed: int = 0, **config_overrides):
    """A random tiny MHA Whisper with `tiny_generation_config` (so timestamps, beams and the pipeline work)."""
    model = random_whisper(tiny_whisper_config(**config_overrides), seed)
    model.generation_config = tiny_generation_config()
    return model


def _filler_token(index: int) -> str:
    """ " a", " b", ..., " z", " aa", ...: a distinct word-like token (in byte-level spelling) for each index."""
    name = ""
    while True:
        name = chr(ord("a") + index % 26) + name
        index = index // 26 - 1
        if index < 0:
            return "Ġ" + name


def tiny_whisper_tokenizer():
    """A WhisperTokenizer with OpenAI's English-only layout, built from a small byte-level BPE vocabulary.

    Ids 0-255 are the 256 byte symbols (in GPT-2's order: " " is 220), then one token per word of WORDS (merged
    letter by letter, leading-space forms first so that they win), then word-like fillers up to <|endoftext|>
    (50256), the special tokens (<|startoftranscript|> 50257, 99 languages, tasks, <|notimestamps|> 50362) and the
    1501 timestamps <|0.00|> (50363) ... <|30.00|> (51863). A random model's output decodes to words; text encodes
    to bytes except for WORDS.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    merges = []
    for spelling in ["Ġ" + word for word in WORDS] + WORDS:
        for end in range(2, len(spelling) + 1):
            if spelling[:end] not in vocab:
                vocab[spelling[:end]] = len(vocab)
                merges.append((spelling[: end - 1], spelling[end - 1]))
    index = 0
    while len(vocab) < EOT:
        token, index = _filler_token(index), index + 1
        vocab.setdefault(token, len(vocab))
    vocab["<|endoftext|>"] = EOT
    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:NUM_LANGUAGES]]
    specials = ["<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials, pad_token="<|endoftext|>",
                                 model_max_length=448)
    timestamps = ["<|%.2f|>" % (i * 0.02) for i in range(1501)]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    ids = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|startofprev|>", "<|notimestamps|>",
                                           timestamps[0]])
    assert len(tokenizer) == VOCAB_SIZE and ids == [SOT, PREV_SOT, NO_TIMESTAMPS, FIRST_TIMESTAMP], ids
    return tokenizer


def tiny_whisper_processor():
    """WhisperProcessor: the 80-mel feature extractor of tiny.en and `tiny_whisper_tokenizer`."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                            tokenizer=tiny_whisper_tokenizer())


# --------------------------------------------------------------------------------------------- audio and data


def tone(frequency: float, sampling_rate: int = SAMPLING_RATE, seconds: float = 1.0, amplitude: float = 0.3,
         channels: int = 1, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A sine (float32; (T,) or (T, channels)), with Gaussian noise of std `noise` drawn from `seed` if asked."""
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    wave = amplitude * np.sin(2 * np.pi * frequency * t)
    if noise:
        wave = wave + noise * np.random.default_rng(seed).standard_normal(len(t))
    wave = wave.astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def noise_clips(seconds=(1, 2, 4), scale: float = 0.1, seed: int = 0) -> list[np.ndarray]:
    """Reproducible 16 kHz Gaussian noise clips, one per length in `seconds`."""
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(int(SAMPLING_RATE * s))).astype(np.float32) for s in seconds]


def write_manifest(path, entries: list[dict]) -> str:
    """Writes a JSON manifest ({"annotation": entries}) and returns its path."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"annotation": entries}, f)
    return str(path)


def write_clips(folder, texts, sampling_rate: int = SAMPLING_RATE, extension: str = ".wav",
                manifest: str | None = "manifest.json") -> list:
    """Writes one tone per text (`clip{i}{extension}`, 1 s + 0.25 s per index, 220 + 110 Hz per index) and, unless
    `manifest` is None, a manifest of them with the texts. Returns the clip paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, _ in enumerate(texts):
        path = os.path.join(folder, f"clip{index}{extension}")
        soundfile.write(path, tone(220 + 110 * index, sampling_rate, 1.0 + 0.25 * index), sampling_rate)
        paths.append(path)
    if manifest is not None:
        write_manifest(os.path.join(folder, manifest),
                       [{"path": os.path.basename(p), "text": text} for p, text in zip(paths, texts)])
    return paths


# --------------------------------------------------------------------------------------------- fresh processes


PROJECT_MODULES = ["configuration_whisper_mla", "modeling_whisper_mla", "pipeline_whisper_mla",
                   "convert_whisper_to_mla", "import_ctranslate2", "run_eval", "run_finetune", "whisper_mla"]

# Runs first in the fresh process: any import of a project module fails, so only the checkpoint's own code is used.
BLOCK_PROJECT = f"""
import importlib.abc, sys
class _BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT_MODULES!r}:
            raise ImportError("project module " + name + " imported outside the checkpoint")
sys.meta_path.insert(0, _BlockProject())
"""


def fresh_env(**updates) -> dict:
    """This process's environment for a child: no PYTHONPATH (the checkout is not importable unless the child runs
    in it), no WHISPER_MLA_TRACEBACK (errors print their one sentence), offline, one OpenMP thread; then `updates`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WHISPER_MLA_TRACEBACK")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update(updates)
    return env


def run_script(script: str, args: list, cwd, env: dict | None = None, timeout: float = 600):
    """Runs one of the repository's scripts (e.g. "run_eval.py") in a new interpreter; returns the CompletedProcess
    (text output captured, not checked)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          env=env if env is not None else fresh_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_fresh(code: str, tmp_path, env: dict | None = None) -> dict:
    """Runs `code` in a new interpreter in `tmp_path` (outside the repo), where importing a project module fails;
    the code prints one JSON line last, which is returned. `env` updates `fresh_env()`."""
    script = tmp_path / "fresh.py"
    script.write_text(BLOCK_PROJECT + textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=fresh_env(**(env or {})),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
