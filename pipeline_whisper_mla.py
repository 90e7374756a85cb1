"""ASR pipeline for Whisper-MLA checkpoints, shipped with each checkpoint and named in `config.custom_pipelines`.

transformers' ASR pipeline takes Whisper's path (30 s chunking, timestamps, generate kwargs) only when
`config.model_type == "whisper"` and falls back to CTC decoding otherwise. Whisper-MLA keeps its own model_type (so
that loading it without `trust_remote_code` fails loudly), so this class restores Whisper's path.
"""

from transformers import AutomaticSpeechRecognitionPipeline


class WhisperMLAPipeline(AutomaticSpeechRecognitionPipeline):
    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        if getattr(self.model.config, "model_type", None) != "whisper_mla":
            raise ValueError(
                f"WhisperMLAPipeline expects a Whisper-MLA model (model_type 'whisper_mla'), but found "
                f"{self.model.config.model_type!r}; use pipeline('automatic-speech-recognition') for other models."
            )
        self.type = "seq2seq_whisper"
