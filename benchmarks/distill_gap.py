"""How far a student is from its teacher on each speech set, per token: KL(teacher || student) of the next-token
distributions on the teacher's own greedy transcripts (teacher-forced, as label-free distillation trains), averaged
over each set's tokens, and per speaker. A set the student was calibrated or trained on shows what training there
can still gain; a set of speakers it never heard shows what it loses on them. Writes OUTPUT_FILE (JSON) and prints
a table.

    python benchmarks/distill_gap.py --model_name_or_path outputs/e1/init \
        --teacher_model_name_or_path ~/.cache/whisper_mla/models/whisper-tiny.en \
        --data outputs/e1/train.json ~/.cache/whisper_mla/speech/multi_eval.json --output_file outputs/gap.json
"""

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from whisper_mla.audio import SAMPLING_RATE, load_speech_dataset
from whisper_mla.io import write_json_atomic
from whisper_mla.training.data import precompute_targets
from whisper_mla.training.distillation import token_kl
from whisper_mla.training.models import load_processor, load_whisper


@dataclass
class GapArguments:
    model_name_or_path: str = field(metadata={"help": "The student: a Whisper-MLA (or Whisper) checkpoint folder."})
    teacher_model_name_or_path: str = field(metadata={"help": "The teacher: the MHA original."})
    data: list[str] = field(metadata={"help": "Speech sets (manifests or folders that run_eval.py reads)."})
    output_file: str = field(default="distill_gap.json")
    max_samples: int = field(default=64, metadata={"help": "Clips per set, the first ones in its order."})
    batch_size: int = field(default=8)
    max_new_tokens: int = field(default=128, metadata={"help": "Longest teacher transcript, in tokens."})


@torch.no_grad()
def clip_kl(student, teacher, features: torch.Tensor, labels: list[list[int]]) -> list[torch.Tensor]:
    """Per clip, the KL(teacher || student) of every label position: a list of (T_i,) tensors.

    `labels` hold `<|startoftranscript|> ... <|endoftext|>`, as `precompute_targets` returns them; the decoder reads
    them shifted right, as in training, and each position predicts the next label.
    """
    targets = [torch.tensor(ids[1:]) for ids in labels]  # the decoder start token is prepended again below
    padded = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=-100)  # (B, T)
    config = teacher.config
    decoder_input_ids = shift_tokens_right(padded, config.pad_token_id, config.decoder_start_token_id)
    mask = padded.ne(-100)
    kl = token_kl(student(features, decoder_input_ids=decoder_input_ids).logits[mask],
                  teacher(features, decoder_input_ids=decoder_input_ids).logits[mask])  # (sum of T_i,), row by row
    return list(kl.split([len(t) for t in targets]))


def set_gap(student, teacher, processor, data: str, args: GapArguments) -> dict:
    """The mean token KL of one set, overall (over all its tokens) and per speaker, with the clip and token counts."""
    examples = load_speech_dataset(data, max_samples=args.max_samples, require_text=False).examples
    audios = [e["audio"] for e in examples]
    prefix = processor.tokenizer.prefix_tokens
    _, labels = precompute_targets(audios, processor.feature_extractor, teacher=teacher, batch_size=args.batch_size,
                                   prefix=prefix, generate_kwargs={"max_new_tokens": args.max_new_tokens})
    per_speaker = defaultdict(list)
    for start in range(0, len(audios), args.batch_size):
        batch = slice(start, start + args.batch_size)
        features = processor.feature_extractor(audios[batch], sampling_rate=SAMPLING_RATE,
                                               return_tensors="pt").input_features  # (B, n_mels, 3000)
        for example, kl in zip(examples[batch], clip_kl(student, teacher, features, labels[batch])):
            per_speaker[example["speaker"] or "-"].append(kl)
    tokens = {speaker: torch.cat(kls) for speaker, kls in per_speaker.items()}
    every = torch.cat(list(tokens.values()))
    return {"data": data, "clips": len(audios), "tokens": int(every.numel()), "kl": float(every.mean()),
            "speakers": {s: {"clips": len(per_speaker[s]), "tokens": int(t.numel()), "kl": float(t.mean())}
                         for s, t in sorted(tokens.items())}}


def main() -> None:
    (args,) = HfArgumentParser(GapArguments).parse_args_into_dataclasses()
    student, _ = load_whisper(args.model_name_or_path)
    teacher, _ = load_whisper(args.teacher_model_name_or_path)
    student.eval(), teacher.eval()
    processor = load_processor(args.teacher_model_name_or_path)
    results = {"model": args.model_name_or_path, "teacher": args.teacher_model_name_or_path,
               "sets": [set_gap(student, teacher, processor, data, args) for data in args.data]}
    write_json_atomic(args.output_file, results, indent=2)
    print("| set | clips | tokens | KL(teacher || student) per token | speakers (KL) |\n|---|---|---|---|---|")
    for r in results["sets"]:
        speakers = ", ".join(f"{s} {v['kl']:.3f}" for s, v in r["speakers"].items())
        print(f"| {r['data']} | {r['clips']} | {r['tokens']} | {r['kl']:.4f} | {speakers} |")


if __name__ == "__main__":
    main()
