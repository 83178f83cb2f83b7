"""Captioning metrics (CIDEr-D, BLEU-1..4, ROUGE-L, SPIDEr formula) on hand-computed tiny corpora."""

from __future__ import annotations

import math
import random

import pytest

from tta.metrics.captioning import (
    bleu,
    bleu1,
    caption_metrics,
    cider_d,
    cider_d_per_clip,
    exact_match,
    rouge_l,
    spider,
    words,
)

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------ CIDEr-D
def test_cider_d_identical_candidate_scores_orders_it_has() -> None:
    # N = 2 clips, no n-gram shared by the two reference sets: every df = 1, every idf = ln 2 - ln 1.
    # Clip A ("a dog barks", 3 words): orders 1, 2, 3 identical -> clipped cosine 1 each; no 4-gram -> 0;
    # same length -> penalty 1. Per reference (1 + 1 + 1 + 0) / 4; mean over its 2 references; x10 = 7.5.
    # Clip B ("rain falls"): (1 + 1 + 0 + 0) / 4 x 10 = 5.0. Corpus: 6.25.
    cands = ["a dog barks", "Rain falls."]
    refs = [["a dog barks", "A dog barks!"], ["rain falls"]]
    assert cider_d_per_clip(cands, refs) == pytest.approx([7.5, 5.0], abs=1e-12)
    assert cider_d(cands, refs) == pytest.approx(6.25, abs=1e-12)
    # four words reach 10: every order 1..4 is identical
    four = cider_d_per_clip(["a dog barks loudly", "rain"], [["a dog barks loudly"], ["rain"]])
    assert four[0] == pytest.approx(10.0, abs=1e-12) and four[1] == pytest.approx(2.5, abs=1e-12)


def test_cider_d_no_overlap_is_zero() -> None:
    assert cider_d_per_clip(["a dog barks", "wind blows"], [["a dog barks"], ["rain falls"]]) == [
        pytest.approx(7.5), 0.0]  # fmt: skip


def test_cider_d_df_over_references_of_the_corpus() -> None:
    # refs A "a dog barks", B "a cat meows": "a" is in both reference sets -> df 2 -> idf ln2 - ln2 = 0.
    # A = "a dog": order 1: cand {a: 0, dog: ln2}, ref {a: 0, dog: ln2, barks: ln2}
    #   -> ln2^2 / (ln2 * sqrt(2) ln2) = 1/sqrt(2); order 2: cand {a dog: ln2}, ref {a dog, dog barks}
    #   -> 1/sqrt(2); orders 3, 4: 0. Lengths 2 vs 3 -> penalty exp(-1 / 72).
    #   CIDEr-D = 10 * (2 / sqrt(2)) / 4 * exp(-1/72)
    # B = "a cat purrs": "purrs" is in no reference -> df clamped to 1 -> idf ln2.
    #   order 1: {a: 0, cat: ln2, purrs: ln2} . {a: 0, cat: ln2, meows: ln2} = ln2^2 / (2 ln2^2) = 1/2;
    #   order 2: {a cat, cat purrs} . {a cat, cat meows} = 1/2; order 3: 0. CIDEr-D = 10 * 1 / 4 = 2.5
    cands, refs = ["a dog", "a cat purrs"], [["a dog barks"], ["a cat meows"]]
    expected_a = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider_d_per_clip(cands, refs) == pytest.approx([expected_a, 2.5], abs=1e-12)
    # df counts references only: a candidate full of A's n-grams leaves clip A's weights unchanged
    assert cider_d_per_clip(["a dog", "a dog barks dog barks"], refs)[0] == pytest.approx(expected_a, abs=1e-12)
    # ... while a reference does change them ("dog" now in both reference sets: idf 0)
    assert cider_d_per_clip(cands, [["a dog barks"], ["a dog meows"]])[0] != pytest.approx(expected_a)
    # a clip counts once in df however many of its references hold the n-gram: two copies of the
    # same reference give the same score as one
    assert cider_d_per_clip(cands, [["a dog barks"] * 2, ["a cat meows"]]) == pytest.approx([expected_a, 2.5])


def test_cider_d_clips_repeated_words() -> None:
    # "dog dog" vs "dog barks" (other clip "rain falls"): idf ln2 everywhere.
    # order 1: cand {dog: 2 ln2}, ref {dog: ln2, barks: ln2}; clipped dot min(2ln2, ln2) ln2 = ln2^2;
    #   norms 2 ln2 * sqrt(2) ln2 -> 1 / (2 sqrt 2) (unclipped would be 1/sqrt 2); order 2: "dog dog" -> 0.
    #   CIDEr-D = 10 * (1 / (2 sqrt 2)) / 4
    got = cider_d_per_clip(["dog dog", "rain falls"], [["dog barks"], ["rain falls"]])[0]
    assert got == pytest.approx(10 / (8 * math.sqrt(2)), abs=1e-12)


def test_cider_d_gaussian_length_penalty() -> None:
    # "dog barks" vs "dog barks dog barks dog barks dog barks" (8 words):
    # order 1: cand {dog: ln2, barks: ln2}, ref {dog: 4ln2, barks: 4ln2}: clipped dot 2 * ln2 * 4ln2,
    #   norms sqrt2 ln2 * 4 sqrt2 ln2 -> 1; order 2: cand {dog barks: ln2}, ref {dog barks: 4 ln2,
    #   barks dog: 3 ln2} -> 4 ln2^2 / (ln2 * 5 ln2) = 0.8; orders 3, 4: 0.
    # length difference 6, sigma 6 -> exp(-36 / 72) = exp(-0.5). CIDEr-D = 10 * 1.8 / 4 * exp(-0.5)
    cands = ["dog barks", "rain falls"]
    refs = [["dog barks dog barks dog barks dog barks"], ["rain falls"]]
    assert cider_d_per_clip(cands, refs)[0] == pytest.approx(4.5 * math.exp(-0.5), abs=1e-12)
    assert cider_d_per_clip(cands, refs, sigma=1e9)[0] == pytest.approx(4.5, abs=1e-9)
    assert cider_d_per_clip(cands, refs, scale=1.0)[0] == pytest.approx(0.45 * math.exp(-0.5), abs=1e-12)


def test_cider_d_single_clip_is_zero_and_empty_candidate_is_zero() -> None:
    assert cider_d(["a dog barks"], [["a dog barks"]]) == 0.0  # log N = log 1: every weight is 0
    assert cider_d_per_clip(["", "rain"], [["a dog"], ["rain"]])[0] == 0.0


def test_multiple_references_beat_one() -> None:
    # the candidate paraphrases the second reference of clip A only
    cands = ["a dog is barking loudly", "rain falls on a roof"]
    one = [["a hound howls"], ["rain falls on a roof"]]
    both = [["a hound howls", "a dog is barking loudly nearby"], ["rain falls on a roof"]]
    assert cider_d_per_clip(cands, one)[0] == 0.0 < cider_d_per_clip(cands, both)[0]
    b1, b2 = bleu(cands, one), bleu(cands, both)
    assert all(b2[k] > b1[k] for k in b1), (b1, b2)
    assert rouge_l(cands[0], both[0]) > rouge_l(cands[0], one[0])
    assert exact_match("A dog is barking loudly.", ["a hound howls", "a dog is barking loudly"]) == 1.0
    assert exact_match("a dog", "a hound") == 0.0


# --------------------------------------------------------------------------------------- BLEU
def test_bleu_corpus_values() -> None:
    # clip 1: "a dog barks loudly" vs {"a dog barks loudly", "dog barks"}: closest ref length 4;
    # clip 2: "the rain falls" vs {"rain falls on a roof"}: ref length 5. c = 7, r = 9 -> BP = exp(1 - 9/7)
    # p1 = (4 + 2) / (4 + 3) = 6/7   (the: no match)
    # p2 = (3 + 1) / (3 + 2) = 4/5   ("rain falls" matches, "the rain" does not)
    # p3 = (2 + 0) / (2 + 1) = 2/3
    # p4 = (1 + 0) / (1 + 0) = 1     (clip 2 has no 4-gram)
    cands = ["a dog barks loudly", "the rain falls"]
    refs = [["a dog barks loudly", "dog barks"], ["rain falls on a roof"]]
    bp = math.exp(1 - 9 / 7)
    p = [6 / 7, 4 / 5, 2 / 3, 1.0]
    got = bleu(cands, refs)
    for n in range(1, 5):
        assert got[f"bleu{n}"] == pytest.approx(bp * math.prod(p[:n]) ** (1 / n), abs=1e-12), n
    # no brevity penalty once the candidates are as long as the closest references
    assert bleu(["a dog barks"], [["a dog barks"]]) == {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 0.0}


def test_bleu_closest_reference_length_and_clipping() -> None:
    # candidate 4 words, references of 3 and 5 words: both at distance 1 -> the shorter (3) -> BP 1
    assert bleu1("a dog barks loudly", ["a dog barks", "the dog barks loudly now"]) == 1.0
    # candidate 2 words, references 3 and 6 words: closest 3 -> BP exp(1 - 3/2); "dog dog" clipped to 1/2
    expected = 0.5 * math.exp(1 - 3 / 2)
    assert bleu1("dog dog", ["a dog barks", "a dog barks at the cat"]) == pytest.approx(expected, abs=1e-12)
    # the old single-reference sentence BLEU-1: 2 of 3 words match, BP exp(1 - 4/3)
    assert bleu1("a dog runs", "a dog barks loudly") == pytest.approx(2 / 3 * math.exp(1 - 4 / 3), abs=1e-12)
    assert bleu1("", "a dog") == 0.0


# ------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_max_precision_and_recall_over_references() -> None:
    # LCS("a dog barks", "the dog barks now") = 2; P = 2/3, R = 2/4, beta 1.2
    p, r = 2 / 3, 2 / 4
    assert rouge_l("a dog barks", "The dog barks, now!") == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
    # coco-caption maximises P and R separately: ref 1 gives P = 2/4 (LCS "dog barks" of 8 words,
    # R = 2/8), ref 2 ("rain") gives R = 1/1 (P = 1/4); F from P = 1/2, R = 1:
    # 2.44 * 0.5 / (1 + 1.44 * 0.5) = 1.22 / 1.72, above either reference's own F
    cand = "dog barks in rain"
    refs = ["dog barks at a cat on the road", "rain"]
    assert rouge_l(cand, refs) == pytest.approx(1.22 / 1.72, abs=1e-12)
    assert rouge_l(cand, refs) > max(rouge_l(cand, r) for r in refs)
    assert rouge_l("", "a dog") == 0.0 and rouge_l("wind", ["rain falls"]) == 0.0


# -------------------------------------------------------------------------------- suite, SPIDEr
def test_caption_metrics_suite_and_spider() -> None:
    cands = ["a dog barks", "Rain falls."]
    refs = [["a dog barks", "A dog barks!"], "rain falls"]  # a single reference may be a plain string
    got = caption_metrics(cands, refs)
    assert set(got) == {"cider_d", "bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "exact"}
    assert got["cider_d"] == pytest.approx(6.25) and got["exact"] == 1.0 and got["rougeL"] == pytest.approx(1.0)
    assert got["bleu3"] == 1.0 and got["bleu4"] == 0.0  # clip 2 has no trigram but clip 1's matches
    assert spider(got["cider_d"], 0.25) == pytest.approx(3.25)
    assert words("A Dog's bark, LOUD!") == ["a", "dog", "s", "bark", "loud"]


def test_bad_inputs_are_refused() -> None:
    for fn in (cider_d, bleu, caption_metrics):
        with pytest.raises(ValueError, match="at least one clip"):
            fn([], [])
        with pytest.raises(ValueError, match="2 candidates but 1 reference sets"):
            fn(["a", "b"], [["a"]])
        with pytest.raises(ValueError, match=r"references\[1\] is empty"):
            fn(["a", "b"], [["a"], []])
        with pytest.raises(ValueError, match=r"references\[0\]\[1\] has no words"):
            fn(["a", "b"], [["a", " ?! "], ["b"]])
        with pytest.raises(TypeError, match="single str"):
            fn("a dog", ["a dog"])
        with pytest.raises(TypeError, match=r"candidates\[1\] is a NoneType"):
            fn(["a", None], [["a"], ["b"]])
    with pytest.raises(ValueError, match="sigma > 0"):
        cider_d(["a", "b"], [["a"], ["b"]], sigma=0.0)


# ------------------------------------------------------------- the coco-caption code, if installed
def _random_corpus(seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    vocab = ["a", "dog", "barks", "car", "passes", "rain", "falls", "on", "the", "roof", "bird", "sings", "then"]

    def sent() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 10)))

    n = rng.randint(2, 8)
    return [sent() for _ in range(n)], [[sent() for _ in range(rng.randint(1, 5))] for _ in range(n)]


def test_matches_pycocoevalcap() -> None:
    """CIDEr-D, ROUGE-L and BLEU against pycocoevalcap's scorers (skipped when not installed).

    The inputs are already normalised (our `words`), so the Java PTB tokenizer is not needed.
    """
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    for seed in range(10):
        cands, refs = _random_corpus(seed)
        gts, res = dict(enumerate(refs)), {i: [c] for i, c in enumerate(cands)}
        _, per_clip = cider_mod.Cider().compute_score(gts, res)
        assert cider_d_per_clip(cands, refs) == pytest.approx(list(per_clip), abs=1e-9)
        rouge, _ = rouge_mod.Rouge().compute_score(gts, res)
        assert caption_metrics(cands, refs)["rougeL"] == pytest.approx(rouge, abs=1e-12)
        coco_bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
        ours = bleu(cands, refs)
        for n, value in enumerate(coco_bleu, start=1):  # coco adds 1e-15 / 1e-9: ~1e-5 where ours is 0
            assert ours[f"bleu{n}"] == pytest.approx(value, abs=1e-4 if ours[f"bleu{n}"] == 0 else 1e-9)


def test_matches_aac_metrics() -> None:
    """CIDEr-D against aac-metrics (skipped when it, or its msclap dependency, is not installed)."""
    aac = pytest.importorskip("aac_metrics.functional.cider_d")
    for seed in range(5):
        cands, refs = _random_corpus(seed)
        _, sents = aac.cider_d(cands, refs)
        assert cider_d_per_clip(cands, refs) == pytest.approx(sents["cider_d"].tolist(), abs=1e-9)
