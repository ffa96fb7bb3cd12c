"""Decontamination: n-gram overlap and substring matching."""

from __future__ import annotations

import pytest

from rlhfkit.eval.decontamination import (
    build_index,
    build_substring_index,
    contaminated,
    contamination_report,
    ngrams,
    normalise_whitespace,
    substring_match,
)

EVAL = "Natalia sold clips to forty eight of her friends in April and then half as many in May"
WORDS = EVAL.split()


def filler(k: int, tag: str = "w") -> str:
    """k words that occur in no eval text."""
    return " ".join(f"{tag}{i}" for i in range(k))


def test_ngrams_exact():
    assert ngrams("A b  C\td", 2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert ngrams("a b a b", 2) == {("a", "b"), ("b", "a")}
    assert ngrams("one two", 3) == set()
    assert ngrams("one two three", 3) == {("one", "two", "three")}
    assert ngrams("x", 1) == {("x",)}
    assert len(ngrams(EVAL, 8)) == len(WORDS) - 7
    with pytest.raises(ValueError, match="n must be >= 1"):
        ngrams("x", 0)


def test_planted_8gram_caught_7gram_not():
    index = build_index([EVAL], n=8)
    for start in (0, 5, len(WORDS) - 8):
        planted8 = f"{filler(20)} {' '.join(WORDS[start : start + 8])} {filler(20, 'v')}"
        planted7 = f"{filler(20)} {' '.join(WORDS[start : start + 7])} {filler(20, 'v')}"
        assert contaminated(planted8, index, n=8)
        assert not contaminated(planted7, index, n=8)
    # Two disjoint 7-grams of the eval text, separated, are still not an 8-gram.
    two = f"{' '.join(WORDS[:7])} zzz {' '.join(WORDS[8:15])}"
    assert not contaminated(two, index, n=8)
    assert not contaminated(filler(100), index, n=8)


def test_case_and_whitespace_insensitive_but_punctuation_sensitive():
    index = build_index([EVAL], n=8)
    shouted = "\n".join(w.upper() for w in WORDS[2:10])
    assert contaminated(f"Prefix:  {shouted}\t suffix", index, n=8)
    commas = ", ".join(WORDS[2:10])  # "clips, to, forty, ...": different tokens
    assert not contaminated(commas, index, n=8)


def test_threshold_configurable():
    seven = " ".join(WORDS[3:10])
    assert contaminated(seven, build_index([EVAL], n=7), n=7)
    assert not contaminated(seven, build_index([EVAL], n=8), n=8)
    assert contaminated(" ".join(WORDS[3:16]), build_index([EVAL], n=13), n=13)
    assert not contaminated(" ".join(WORDS[3:15]), build_index([EVAL], n=13), n=13)


def test_short_eval_texts_have_no_ngrams():
    index = build_index(["What is 2 + 3?", EVAL], n=8)
    assert index == build_index([EVAL], n=8)
    assert not contaminated("Question: What is 2 + 3? Think step by step.", index, n=8)


def test_substring_50_chars():
    eval_text = (
        "The   quick brown fox jumps over the lazy dog\nwhile the cat sleeps on the warm mat."
    )
    norm = normalise_whitespace(eval_text)
    assert (
        norm == "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."
    )
    piece = norm[10:60]
    assert len(piece) == 50
    assert substring_match(f"xx {piece} yy", [eval_text])
    assert not substring_match(f"@@{piece[:49]}@@", [eval_text])
    # Whitespace differences do not matter, case does.
    assert substring_match("zz " + piece.replace(" ", "\n  "), [eval_text])
    assert not substring_match(piece.upper(), [eval_text])
    # The prebuilt index gives the same answers.
    index = build_substring_index([eval_text], 50)
    assert len(index) == len(norm) - 49
    assert substring_match(f"xx {piece} yy", index)
    assert not substring_match(f"@@{piece[:49]}@@", index)
    assert substring_match(piece[:20], [eval_text], length=20)
    # An eval text shorter than the window can never match.
    assert build_substring_index(["short text"], 50) == frozenset()
    assert not substring_match("a short text b" * 10, ["short text"])
    with pytest.raises(ValueError, match="length must be >= 1"):
        build_substring_index([eval_text], 0)


def test_report_rates_and_indices():
    other = "Write a haiku about the sea and the moon over the quiet harbour at night please"
    train = [
        filler(30),  # 0: clean
        f"{filler(5)} {' '.join(WORDS[0:8])}",  # 1: gsm
        f"{' '.join(other.split()[4:12])} {filler(3)}",  # 2: poems
        f"{' '.join(WORDS[4:12])} / {' '.join(other.split()[:8])}",  # 3: both
        " ".join(WORDS[0:7]),  # 4: a 7-gram only: clean
    ]
    report = contamination_report(train, {"gsm": [EVAL, "tiny"], "poems": [other]}, n=8)
    assert report["n"] == 8 and report["substring"] is None and report["train_rows"] == 5
    gsm, poems = report["sets"]["gsm"], report["sets"]["poems"]
    assert gsm == {"flagged": [1, 3], "count": 2, "rate": 0.4, "eval_rows": 2, "eval_too_short": 1}
    assert poems == {
        "flagged": [2, 3],
        "count": 2,
        "rate": 0.4,
        "eval_rows": 1,
        "eval_too_short": 0,
    }
    assert report["any"] == {"flagged": [1, 2, 3], "count": 3, "rate": 0.6}


def test_report_with_substring_matching():
    # 7 words but 51 characters: the n-gram misses it, the 50-character window catches it.
    eval_text = "Antidisestablishmentarianism notwithstanding, extraordinary circumstances"
    train = [f"Consider: {eval_text[:51]} ok", "nothing here"]
    assert len(eval_text[:51].split()) < 8
    plain = contamination_report(train, {"e": [eval_text]}, n=8)
    assert plain["sets"]["e"]["flagged"] == [] and plain["sets"]["e"]["eval_too_short"] == 1
    sub = contamination_report(train, {"e": [eval_text]}, n=8, substring=50)
    assert sub["sets"]["e"]["flagged"] == [0] and sub["sets"]["e"]["eval_too_short"] == 0
    assert sub["any"]["rate"] == 0.5


def test_report_empty_train():
    report = contamination_report([], {"e": [EVAL]})
    assert report["sets"]["e"]["rate"] == 0.0 and report["any"]["count"] == 0
