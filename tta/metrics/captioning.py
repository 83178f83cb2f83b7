"""Audio-captioning metrics against several references per clip: CIDEr-D, BLEU-1..4, ROUGE-L.

These follow the coco-caption evaluation code used by the DCASE automated-audio-captioning task
(and by the MS-CLAP paper's captioning numbers), re-written here in plain Python. Each function
takes ``candidates`` (one generated caption per clip) and ``references`` (per clip, a list of
reference captions, or one string for a single reference).

Text normalisation (`words`): lower case, every character that is neither a word character nor
whitespace replaced by a space, split on whitespace. coco-caption instead runs the Stanford
PTBTokenizer (Java) and then drops punctuation tokens; both agree on ordinary captions and differ
on contractions and hyphens ("don't": PTB ``do n't``, here ``don t``; "x-ray": PTB ``x-ray``,
here ``x ray``).

**CIDEr-D** (Vedantam, Zitnick, Parikh, "CIDEr: Consensus-based Image Description Evaluation",
CVPR 2015, arXiv:1411.5726, section on CIDEr-D; reference code: the ``CiderD`` scorer of
vrama91/cider, also shipped as ``Cider`` in pycocoevalcap 1.2 and as ``cider_d`` in aac-metrics):

- n-grams of order n = 1..4, counted per sentence (term frequency ``tf``);
- document frequency ``df(g)`` = the number of clips whose *reference set* contains ``g`` (a
  clip counts once however many of its references hold it), computed over the references of
  the evaluated corpus only (coco-caption's ``df="corpus"`` mode; candidates never count);
- weight of ``g`` in a sentence: ``tf(g) * (log N - log(max(1, df(g))))`` with N the number of
  clips, natural log; an n-gram absent from every reference gets ``log N``;
- for each order n, the similarity of the candidate ``c`` and one reference ``r`` is
  ``sum_g min(c_g, r_g) * r_g / (||c|| ||r||)`` (the candidate's weight *clipped* by the
  reference's, CIDEr-D's guard against repeated words; 0 when a norm is 0), times the Gaussian
  length penalty ``exp(-(len(c) - len(r))^2 / (2 sigma^2))`` with ``sigma = 6``. The reference
  code measures length as the candidate's number of bigrams (words - 1); the difference of two
  lengths is the same as with word counts for every non-empty sentence, and an empty candidate
  scores 0 either way, so word counts are used here;
- clip score = ``10 * mean over n of (mean over the clip's references of the similarity)``
  (x10 "to make the scores numerically similar to other metrics"); corpus score = mean over
  clips. A corpus of one clip scores 0 (every weight is ``log 1 - log 1``; aac-metrics refuses
  it); an identical caption does not reach 10 unless it has 4-grams (a 3-word caption identical
  to its references scores 7.5: its 4-gram term is 0).

**BLEU-1..4** (Papineni et al., ACL 2002; coco-caption ``Bleu`` with ``option="closest"``):
corpus-level. Per order, clipped n-gram matches (each candidate n-gram count clipped by its
largest count in any one reference of the clip) summed over the corpus, divided by the summed
candidate n-grams; BLEU-N = brevity penalty x geometric mean of the precisions of orders 1..N;
brevity penalty ``exp(1 - r/c)`` when ``c < r`` else 1, with ``c`` the total candidate length and
``r`` the sum over clips of the reference length closest to the candidate's (ties: the shorter).
A precision of 0 gives exactly 0; coco-caption adds 1e-15 / 1e-9 to numerator / denominator
(so it reports ~1e-5 instead), and for a corpus of *one* clip it uses the average reference
length instead of the closest; this module does neither.

**ROUGE-L** (Lin, 2004; coco-caption ``Rouge``): per clip, ``P = max_j LCS(c, r_j) / |c|`` and
``R = max_j LCS(c, r_j) / |r_j|`` (each maximised over the references separately, as
coco-caption does), ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; corpus = mean over clips.

Not built: **METEOR** (the reference implementation is Java, meteor-1.5.jar) and **SPICE**
(needs Java: the Stanford CoreNLP scene-graph parser). **SPIDEr** = (CIDEr-D + SPICE) / 2 is
offered only as the formula, `spider`, for SPICE values computed elsewhere (e.g. with
pycocoevalcap's ``Spice`` or aac-metrics' ``spice``, which bundle the Java tools).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence

log = logging.getLogger(__name__)

__all__ = [
    "bleu",
    "bleu1",
    "caption_metrics",
    "check_corpus",
    "cider_d",
    "cider_d_per_clip",
    "exact_match",
    "lcs_length",
    "ngram_counts",
    "rouge_l",
    "spider",
    "words",
]

_PUNCT = re.compile(r"[^\w\s]")
References = Sequence[str] | str


def words(text: str) -> list[str]:
    """Lower-cased words of ``text`` without punctuation."""
    return _PUNCT.sub(" ", text.lower()).split()


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of order exactly ``n`` in ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def check_corpus(candidates: Sequence[str], references: Sequence[References]) -> list[list[str]]:
    """Validate a corpus; returns the references as one list of strings per clip.

    Raises ValueError for an empty corpus, a length mismatch, a clip without references or a
    reference without words (naming its index), TypeError for non-strings.
    """
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of captions (one per clip), got a single str")
    if len(candidates) == 0:
        raise ValueError("captioning metrics need at least one clip, got no candidates")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets (one per clip)")
    out: list[list[str]] = []
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if not isinstance(cand, str):
            raise TypeError(f"candidates[{i}] is a {type(cand).__name__}, not a str")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"references[{i}] is empty: every clip needs at least one reference caption")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}][{j}] is a {type(ref).__name__}, not a str")
            if not words(ref):
                raise ValueError(f"references[{i}][{j}] has no words: {ref!r}")
        out.append(refs)
    return out


# ----------------------------------------------------------------------------------- CIDEr-D
_Weights = tuple[dict[tuple[str, ...], float], float]


def _tfidf(counts: Counter[tuple[str, ...]], log_n: float, df: Counter[tuple[str, ...]]) -> _Weights:
    """tf-idf weights of one sentence's n-grams (a single order) and their L2 norm."""
    vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
    return vec, math.sqrt(sum(v * v for v in vec.values()))


def _clipped_cosine(cand: _Weights, ref: _Weights) -> float:
    """``sum_g min(c_g, r_g) r_g / (|c| |r|)``, 0 when either norm is 0."""
    (cv, cn), (rv, rn) = cand, ref
    if cn == 0.0 or rn == 0.0:
        return 0.0
    return sum(min(c, rv[g]) * rv[g] for g, c in cv.items() if g in rv) / (cn * rn)


def cider_d_per_clip(
    candidates: Sequence[str],
    references: Sequence[References],
    n: int = 4,
    sigma: float = 6.0,
    scale: float = 10.0,
) -> list[float]:
    """CIDEr-D of every clip (see the module docstring for the definition); df over ``references``."""
    refs = check_corpus(candidates, references)
    if n < 1 or sigma <= 0:
        raise ValueError(f"cider_d: n must be >= 1 and sigma > 0, got n={n}, sigma={sigma}")
    if len(candidates) == 1:
        log.warning("CIDEr-D of a single clip is 0 by definition (every idf weight is log 1 - log 1)")
    cand_words = [words(c) for c in candidates]
    ref_words = [[words(r) for r in rs] for rs in refs]
    orders = range(1, n + 1)
    cand_counts = [[ngram_counts(ws, k) for k in orders] for ws in cand_words]
    ref_counts = [[[ngram_counts(ws, k) for k in orders] for ws in rs] for rs in ref_words]
    df: Counter[tuple[str, ...]] = Counter()
    for clip in ref_counts:
        df.update({g for ref in clip for counts in ref for g in counts})
    log_n = math.log(float(len(candidates)))
    scores = []
    for cw, cc, rws, rcs in zip(cand_words, cand_counts, ref_words, ref_counts):
        cvec = [_tfidf(c, log_n, df) for c in cc]
        per_order = [0.0] * n
        for rw, rc in zip(rws, rcs):
            penalty = math.exp(-((len(cw) - len(rw)) ** 2) / (2.0 * sigma**2))
            for k in range(n):
                per_order[k] += _clipped_cosine(cvec[k], _tfidf(rc[k], log_n, df)) * penalty
        scores.append(scale * sum(per_order) / n / len(rws))
    return scores


def cider_d(
    candidates: Sequence[str],
    references: Sequence[References],
    n: int = 4,
    sigma: float = 6.0,
    scale: float = 10.0,
) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_per_clip` (document frequencies over this corpus)."""
    scores = cider_d_per_clip(candidates, references, n=n, sigma=sigma, scale=scale)
    return sum(scores) / len(scores)


def spider(cider: float, spice: float) -> float:
    """SPIDEr = (CIDEr-D + SPICE) / 2 (Liu et al., ICCV 2017). SPICE is not computed by tta (it
    needs Java); pass a value computed elsewhere, on the same corpus and normalisation."""
    return (float(cider) + float(spice)) / 2.0


# -------------------------------------------------------------------------------------- BLEU
def bleu(candidates: Sequence[str], references: Sequence[References], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` as ``{"bleu1": ..., "bleu2": ...}`` (closest reference length)."""
    refs = check_corpus(candidates, references)
    if max_n < 1:
        raise ValueError(f"bleu: max_n must be >= 1, got {max_n}")
    matched, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, rs in zip(candidates, refs):
        cw = words(cand)
        rws = [words(r) for r in rs]
        cand_len += len(cw)
        ref_len += min((abs(len(r) - len(cw)), len(r)) for r in rws)[1]
        for k in range(max_n):
            counts = ngram_counts(cw, k + 1)
            best: Counter[tuple[str, ...]] = Counter()
            for r in rws:
                best |= ngram_counts(r, k + 1)  # max count of each n-gram over the references
            matched[k] += sum(min(c, best[g]) for g, c in counts.items())
            total[k] += sum(counts.values())
    brevity = 1.0 if cand_len >= ref_len else (math.exp(1.0 - ref_len / cand_len) if cand_len else 0.0)
    precisions = [m / t if t else 0.0 for m, t in zip(matched, total)]
    out = {}
    for k in range(1, max_n + 1):
        head = precisions[:k]
        out[f"bleu{k}"] = brevity * math.exp(sum(map(math.log, head)) / k) if min(head) > 0 else 0.0
    return out


def bleu1(candidate: str, references: References) -> float:
    """BLEU-1 of one caption: clipped unigram precision times the brevity penalty."""
    return bleu([candidate], [references], max_n=1)["bleu1"]


# ----------------------------------------------------------------------------------- ROUGE-L
def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, references: References, beta: float = 1.2) -> float:
    """ROUGE-L F-measure of one caption, precision and recall each maximised over the references."""
    (refs,) = check_corpus([candidate], [references])
    cand = words(candidate)
    if not cand:
        return 0.0
    lcs = [(lcs_length(cand, ref), len(ref)) for ref in map(words, refs)]
    p = max(m / len(cand) for m, _ in lcs)
    r = max(m / length for m, length in lcs)
    if p == 0.0 or r == 0.0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


# ------------------------------------------------------------------------------------ suite
def exact_match(candidate: str, references: References) -> float:
    """1.0 when the caption's words equal those of one of the references, else 0.0."""
    cand = words(candidate)
    return float(any(words(r) == cand for r in ([references] if isinstance(references, str) else references)))


def caption_metrics(candidates: Sequence[str], references: Sequence[References]) -> dict[str, float]:
    """The corpus suite: ``cider_d``, ``bleu1``..``bleu4``, ``rougeL`` and ``exact`` (means over clips
    for the last two)."""
    refs = check_corpus(candidates, references)
    out = {"cider_d": cider_d(candidates, refs)}
    out.update(bleu(candidates, refs, max_n=4))
    out["rougeL"] = sum(rouge_l(c, r) for c, r in zip(candidates, refs)) / len(refs)
    out["exact"] = sum(exact_match(c, r) for c, r in zip(candidates, refs)) / len(refs)
    return out
