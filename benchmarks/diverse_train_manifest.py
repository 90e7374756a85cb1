"""Training audio from voices and conditions the converter's calibration never heard (issue 11): espeak-ng voices (8
English accents x 40 voice variants; 160 of them, each reading 3 texts of the synthetic text pool at a random rate
and pitch) and augmented copies of the mixed training clips (reverb, white or red noise at 5-20 dB SNR, telephone
band, speed 0.8-1.2, and reverb or speed with noise), shuffled with the first mixed clips. Also a probe set of 8 other
espeak-ng voices (4 clips each) that no training sees, for `benchmarks/distill_gap.py`.

Writes, in OUTPUT_DIR: espeak/, aug/, probe/ (16 kHz WAV), diverse.json (the new training clips), train.json (those
and the mixed ones, shuffled) and probe.json. Deterministic; existing espeak-ng clips are reused.

    python benchmarks/mixed_train_manifest.py outputs/e1/train.json
    python benchmarks/diverse_train_manifest.py --mixed_manifest outputs/e1/train.json --output_dir outputs/e2
"""

import json
import os
import random
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.signal
import soundfile
import soxr
from transformers import HfArgumentParser

from whisper_mla.audio import SAMPLING_RATE, load_audio
from whisper_mla.io import write_json_atomic
from whisper_mla.speech_data import (ensure_speech_sets, is_eval_prompt, python_doc_sentences, read_asterisk_prompts,
                                     synthetic_text_pool)


ACCENTS = "en-us en-gb en-gb-scotland en-gb-x-rp en-029 en-us-nyc en-gb-x-gbcwmd en-gb-x-gbclan".split()
VARIANTS = ("m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 adam Andy Annie belinda benjamin caleb "
            "david ed edward john linda max Michael paul quincy rob robert steph travis victor grandpa grandma norbert "
            "shelby zac").split()
PROBE_VOICES = ["en-us+m3", "en-gb+f2", "en-gb-scotland+m1", "en-gb-x-rp+f4", "en-029+m5", "en-us-nyc+f1",
                "en-gb-x-gbcwmd+m7", "en-gb-x-gbclan+f3"]
PEAK = 0.5


@dataclass
class DiverseArguments:
    mixed_manifest: str = field(metadata={"help": "benchmarks/mixed_train_manifest.py's output (absolute paths)."})
    output_dir: str = field(default="outputs/e2")
    speech_dir: str | None = field(default=None, metadata={
        "help": "Where real_eval.json and multi_eval.json are (their texts are never read aloud); default: "
                "make_speech_data.py's folder, built if missing."})
    num_voices: int = field(default=160, metadata={"help": "espeak-ng accent+variant voices for training."})
    texts_per_voice: int = field(default=3)
    num_augmented: int = field(default=240, metadata={"help": "Augmented copies of random mixed clips."})
    num_mixed: int = field(default=544, metadata={"help": "The first mixed clips, added as they are."})
    seed: int = field(default=0)


def write_peak(path: str, audio: np.ndarray) -> None:
    soundfile.write(path, (audio / max(float(np.abs(audio).max()), 1e-6) * PEAK).astype(np.float32), SAMPLING_RATE)


def speak(voice: str, text: str, path: str, rate: int, pitch: int | None = None) -> None:
    """espeak-ng reads `text` with `voice` (accent+variant) into a 16 kHz WAV at `path` (kept if it exists)."""
    if os.path.exists(path):
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "speech.wav")
        pitch_flag = ["-p", str(pitch)] if pitch is not None else []
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), *pitch_flag, "-w", raw, text], check=True)
        audio, rate_in = soundfile.read(raw, dtype="float32")
    write_peak(path, soxr.resample(audio, rate_in, SAMPLING_RATE))


def augmentations(rng: np.random.Generator) -> dict:
    """name -> function of a float64 waveform, drawing its settings from `rng`."""
    def reverb(a):
        t = np.arange(int(0.5 * SAMPLING_RATE)) / SAMPLING_RATE
        response = rng.standard_normal(t.size) * np.exp(-t / rng.uniform(0.03, 0.12))  # decay time 30-120 ms
        response[0] = 1.0
        return scipy.signal.fftconvolve(a, response)[: a.size]

    def noise(a):
        n = rng.standard_normal(a.size)
        if rng.random() < 0.5:
            n = scipy.signal.lfilter([1.0], [1.0, -0.95], n)  # red
        snr_db = rng.uniform(5, 20)
        return a + n * np.sqrt(np.mean(a**2) / 10 ** (snr_db / 10) / np.mean(n**2))

    def phone(a):
        b, c = scipy.signal.butter(4, [300, 3400], btype="band", fs=SAMPLING_RATE)
        return scipy.signal.lfilter(b, c, a)

    def speed(a):  # resampled: tempo and pitch change together
        return soxr.resample(a, SAMPLING_RATE, int(SAMPLING_RATE / rng.choice([0.8, 0.85, 0.9, 1.1, 1.15, 1.2])))

    return {"reverb": reverb, "noise": noise, "phone": phone, "speed": speed,
            "reverb_noise": lambda a: noise(reverb(a)), "speed_noise": lambda a: noise(speed(a))}


def main() -> None:
    (args,) = HfArgumentParser(DiverseArguments).parse_args_into_dataclasses()
    mixed = json.load(open(args.mixed_manifest))["annotation"]
    if args.num_augmented > len(mixed):
        raise ValueError(f"--num_augmented expects at most the {len(mixed)} clips of {args.mixed_manifest}, but found "
                         f"{args.num_augmented}; pass a smaller number or a larger manifest.")
    out = os.path.abspath(args.output_dir)
    for folder in ("espeak", "aug", "probe"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    rng, noise_rng = random.Random(args.seed), np.random.default_rng(args.seed)
    speech = args.speech_dir or os.path.dirname(ensure_speech_sets(["real_eval", "multi_eval"])["real_eval"])
    eval_texts = [e["text"] for name in ("real_eval", "multi_eval")
                  for e in json.load(open(os.path.join(speech, f"{name}.json")))["annotation"]]
    train_prompts = [p for p in read_asterisk_prompts() if not is_eval_prompt(p[2])]
    texts = [text for _, text in synthetic_text_pool(train_prompts, eval_texts)]

    voices = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS if f"{a}+{v}" not in PROBE_VOICES]
    rng.shuffle(voices)
    jobs, espeak = [], []
    for i, voice in enumerate(voices[: args.num_voices]):
        for k in range(args.texts_per_voice):
            text, path = texts[(args.texts_per_voice * i + k) % len(texts)], f"{out}/espeak/{i:03d}_{k}.wav"
            jobs.append((voice, text, path, rng.randint(140, 200), rng.randint(30, 70)))
            espeak.append({"id": path, "path": path, "text": text, "speaker": f"espeak_{voice}"})
    probe_texts = python_doc_sentences()[::7]
    for i, voice in enumerate(PROBE_VOICES):
        for k in range(4):
            path = f"{out}/probe/{voice.replace('+', '_')}_{k}.wav"
            jobs.append((voice, probe_texts[(4 * i + k) % len(probe_texts)], path, 160, None))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: speak(*job), jobs))
    probe = [{"id": job[2], "path": job[2], "text": job[1], "speaker": job[0]} for job in jobs[len(espeak):]]

    augment = augmentations(noise_rng)
    augmented = []
    for k, index in enumerate(rng.sample(range(len(mixed)), args.num_augmented)):
        clip, name = mixed[index], list(augment)[k % len(augment)]
        path = f"{out}/aug/{k:03d}_{name}.wav"  # always made: each draws from noise_rng, in order
        write_peak(path, augment[name](load_audio(clip["path"]).astype(np.float64)))
        augmented.append({"id": path, "path": path, "text": clip["text"],
                          "speaker": f"{clip.get('speaker') or clip.get('voice')}_{name}"})

    diverse = espeak + augmented
    rng.shuffle(diverse)
    train = diverse + mixed[: args.num_mixed]
    random.Random(args.seed + 1).shuffle(train)
    for name, entries in (("diverse", diverse), ("train", train), ("probe", probe)):
        write_json_atomic(os.path.join(out, f"{name}.json"), {"annotation": entries})
    print(f"{len(espeak)} espeak-ng clips, {len(augmented)} augmented, {len(train)} in train.json, {len(probe)} probe")


if __name__ == "__main__":
    main()
