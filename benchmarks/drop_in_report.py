"""The drop-in matrix on lossy layouts: how far the int8 cache and pooled cross frames move each generate() option.

The exact default is asserted equal to the original in tests/test_drop_in.py; these layouts are not exact, so this
script runs the same cases (`whisper_mla.drop_in.cases`) on them, checks that every case runs, and reports what
differs from the original (rows of sequences, score gaps, segments) as a Markdown table and JSON.

    python benchmarks/drop_in_report.py --model tiny.en --output_dir outputs/drop_in
"""

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import jiwer
from transformers import AutoProcessor, HfArgumentParser, WhisperForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from the checkout, like the run_*.py scripts
from whisper_mla import drop_in  # noqa: E402
from whisper_mla.conversion import convert_whisper_to_mla  # noqa: E402
from whisper_mla.io import write_json_atomic  # noqa: E402
from whisper_mla.metrics import normalize_english  # noqa: E402
from whisper_mla.packaged_models import ensure_packaged_model  # noqa: E402
from whisper_mla.speech_data import ensure_multi_speaker_speech  # noqa: E402

# name -> converter settings; each runs the matrix against the original
LAYOUTS = {
    "exact default": {},
    "int8 cache": {"mla_cache_quantization": "int8"},
    "cross frames pooled by 3": {"cross_latent_stride": 3},
}


def word_drift(processor, reference: dict, found: dict) -> str | None:
    """How far the transcripts moved: word edits against the original's (normalised) text, or None when equal."""
    texts = [[normalize_english(t) for t in processor.batch_decode(d["sequences"], skip_special_tokens=True)]
             for d in (reference, found)]
    if texts[0] == texts[1]:
        return None
    edits = jiwer.process_words(texts[0], texts[1])
    errors, words = edits.substitutions + edits.deletions + edits.insertions, sum(len(t.split()) for t in texts[0])
    return f"text: {errors} word edits in {words} ({100 * errors / words:.1f}% WER against the original)"


@dataclass
class ReportArguments:
    model: str = field(default="tiny.en", metadata={"help": "Packaged real Whisper: tiny.en or base."})
    output_dir: str = field(default="outputs/drop_in", metadata={"help": "Where drop_in.md and drop_in.json go."})
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS), metadata={"help": f"Of {list(LAYOUTS)}."})
    long_clip_ids: list[str] = field(
        default_factory=lambda: [drop_in.LONG_CLIP_ID],
        metadata={"help": "multi_eval_long recordings the long-form cases run on, each in turn (all three: "
                          "sonnet1_librivox mfa_author_joined pocketsphinx_joined)."})
    long_form_only: bool = field(default=False, metadata={"help": "Run only the long-form cases."})


def main():
    (args,) = HfArgumentParser(ReportArguments).parse_args_into_dataclasses()
    unknown = [name for name in args.layouts if name not in LAYOUTS]
    if unknown:
        raise SystemExit(f"Expected --layouts among {list(LAYOUTS)}, but found {unknown}; quote names with spaces.")
    # 1. the original, its inputs and the matrix
    folder = ensure_packaged_model(args.model)
    processor = AutoProcessor.from_pretrained(folder)
    mha = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    models = {layout: convert_whisper_to_mla(mha, **LAYOUTS[layout]).eval() for layout in args.layouts}  # before any
    # generate call on the original, so each layout starts from the same generation state
    sets = ensure_multi_speaker_speech()
    short = drop_in.read_clips(sets["multi_eval"], drop_in.SHORT_CLIP_IDS)
    inputs, cases = {}, []
    matrix = [c for c in drop_in.cases(processor.get_prompt_ids("Asterisk, Kennedy, Montreal.", return_tensors="pt"))
              if mha.generation_config.is_multilingual or not c.multilingual]
    for clip_id, long in zip(args.long_clip_ids, drop_in.read_clips(sets["multi_eval_long"], args.long_clip_ids)):
        for name, value in drop_in.model_inputs(processor, short, long).items():
            inputs[name if name in ("short", "one") else f"{name} {clip_id}"] = value
        cases += [replace(c, name=f"{c.name} ({clip_id})", inputs=f"{c.inputs} {clip_id}") for c in matrix
                  if c.inputs in ("long", "mixed")]
    cases = ([] if args.long_form_only else [c for c in matrix if c.inputs not in ("long", "mixed")]) + cases
    reference = {c.name: drop_in.outputs_of(drop_in.generate(mha, inputs[c.inputs], c.kwargs), c.compare)
                 for c in cases}
    # 2. each layout through every case
    rows = {}
    for layout in args.layouts:
        mla = models[layout]
        rows[layout] = {}
        for case in cases:
            start = time.perf_counter()
            try:
                found = drop_in.outputs_of(drop_in.generate(mla, inputs[case.inputs], case.kwargs), case.compare)
                result = drop_in.differences(reference[case.name], found) or ["same"]
                drift = word_drift(processor, reference[case.name], found)
                result += [drift] if drift else ([] if result == ["same"] else ["text: the same words"])
            except Exception as error:  # a case that fails is what this report exists to show
                result = [f"FAILED: {type(error).__name__}: {str(error)[:200]}"]
            rows[layout][case.name] = result
            print(f"{layout} | {case.name}: {'; '.join(result)} ({time.perf_counter() - start:.1f} s)", flush=True)
    # 3. the report
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "drop_in.json", {"model": args.model, "rows": rows})
    lines = [f"| option ({args.model}) | " + " | ".join(args.layouts) + " |", "|---" * (len(args.layouts) + 1) + "|"]
    for case in cases:
        lines.append(f"| {case.name} | " + " | ".join("; ".join(rows[lay][case.name]) for lay in args.layouts) + " |")
    (out / "drop_in.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [(lay, name) for lay in rows for name, result in rows[lay].items() if result[0].startswith("FAILED")]
    if failed:
        raise SystemExit(f"Expected every case to run on every layout, but {len(failed)} failed: {failed}")


if __name__ == "__main__":
    main()
