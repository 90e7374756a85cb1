"""whisper-mla library code; the top-level `run_*.py` and `convert_whisper_to_mla.py` scripts are thin entry points.

    whisper_mla.io         safe output folders (`atomic_output_dir`) and strict checkpoint loading
                           (`checkpoint_config`, `from_pretrained_strict`)
    whisper_mla.arguments  range checks for numeric script arguments (`check_number`)

The modeling and configuration files stay top-level and self-contained: they are copied into every Whisper-MLA
checkpoint as remote code, so they must not import this package.
"""
