"""Tests for whisper_mla/metrics.py: corpus WER (jiwer) against hand-counted edits, and Whisper's English normaliser."""

import pytest

from whisper_mla.metrics import compute_wer, corpus_wer, find_english_spelling_mapping, get_normalizer, normalize_english


# Hand-counted: (reference, hypothesis, substitutions + deletions + insertions, reference words).
HAND_COUNTED = [
    # "sat" -> "sit" (S), "the" before "mat" dropped (D): 2 edits, 6 words.
    ("the cat sat on the mat", "the cat sit on mat", 2, 6),
    # "big" inserted (I): 1 edit, 2 words.
    ("hello world", "hello big world", 1, 2),
    # "a" -> "x" (S), "c" dropped (D), "f" inserted (I): 3 edits, 5 words.
    ("a b c d e", "x b d e f", 3, 5),
    # "b" -> "x" and "d" -> "e": 2 substitutions (never counted as a deletion plus an insertion), 4 words.
    ("a b c d", "a x c e", 2, 4),
    # Exact match, extra whitespace ignored.
    ("press one  now", " press one now ", 0, 3),
]


@pytest.mark.parametrize("reference, hypothesis, edits, words", HAND_COUNTED)
def test_sentence_wer_hand_counted(reference, hypothesis, edits, words):
    assert corpus_wer([reference], [hypothesis]) == edits / words


def test_corpus_wer_hand_counted():
    references = [reference for reference, _, _, _ in HAND_COUNTED]
    hypotheses = [hypothesis for _, hypothesis, _, _ in HAND_COUNTED]
    # (2 + 1 + 3 + 2 + 0) edits / (6 + 2 + 5 + 4 + 3) words: corpus level, not the mean of sentence WERs.
    assert corpus_wer(references, hypotheses) == 8 / 20


def test_corpus_wer_edge_cases():
    assert corpus_wer(["a b"], [""]) == 1.0  # everything deleted
    assert corpus_wer(["a"], ["a b c"]) == 2.0  # insertions can push WER past 1
    assert corpus_wer(["", "a b"], ["x", "a b"]) == 0.5  # an empty reference counts its insertions


def test_compute_wer_normalises_both_sides():
    result = compute_wer(["Hello, World!", "The colour is grey."], ["hello world", "the color is gray"])
    assert result["wer"] == 0.0  # punctuation, case and British spellings do not count
    assert result["wer_ortho"] == pytest.approx(100 * 5 / 6)  # raw: all but "is" differ
    assert result["hypotheses_normalized"] == ["hello world", "the color is gray"]
    basic = get_normalizer("fr")
    assert basic("Ça va, Monsieur?").strip() == "ça va monsieur"
    assert get_normalizer("English") is normalize_english


def test_corpus_wer_errors():
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        corpus_wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no words"):
        corpus_wer(["", "  "], ["a", "b"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", "hello world"),
        ("I'm sorry, Mr. Smith; that's not valid.", "i am sorry mister smith that is not valid"),
        ("Press 7 to delete this message.", "press 7 to delete this message"),
        ("twenty five dollars", "$25"),
        ("Um, it won't work.", "it will not work"),
        ("Call-Forward on No Answer.", "call forward on no answer"),
    ],
)
def test_normalize_english(text, expected):
    assert normalize_english(text) == expected


def test_normalize_english_spelling_map():
    if find_english_spelling_mapping() is None:
        pytest.skip("Whisper's spelling map is not installed (pip install whisper-normalizer)")
    assert normalize_english("The colour grey is my favourite.") == "the color gray is my favorite"


def test_normalize_english_explicit_map(tmp_path):
    (tmp_path / "normalizer.json").write_text('{"colour": "color"}')
    assert normalize_english("colour", spelling_mapping_path=str(tmp_path)) == "color"
    with pytest.raises(FileNotFoundError, match="no such file"):
        normalize_english("colour", spelling_mapping_path=str(tmp_path / "missing.json"))
