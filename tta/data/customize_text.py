"""Captions of DreamAudio customized items: a clip's caption and captions joined by phrases.

- `clip_caption`: a base clip's first caption; a clip with labels only gets one made from its
  labels (a synthetic event class gets its sentence, "dog_bark" -> "a dog barks"; any other label
  `tta.data.adapters.label_caption`'s "the sound of a dog"; several labels joined with "and").
- `join_captions`: parts in order, each after the first introduced by a phrase drawn from
  `CONNECTION_PHRASES`: ``"a dog barks, then a bell rings, followed by rain falls"``.
- `overlay_caption`: ``"<front>, <phrase> <back>, <overlay phrase> <base>"``.

Parts are normalised (`normalise_part`): surrounding white space and trailing full stops removed;
a part after the first starts lower-case unless it starts with an acronym ("TV", "A.").
"""

from __future__ import annotations

import numpy as np

from tta.data.adapters import label_caption
from tta.data.manifest import ManifestItem
from tta.data.synth import EVENTS

__all__ = ["CONNECTION_PHRASES", "OVERLAY_PHRASES", "CaptionError", "clip_caption", "join_captions", "normalise_part",
           "overlay_caption"]

#: phrases joining captions of events in sequence (the paper's "connection list")
CONNECTION_PHRASES = ("then", "followed by", "and then", "and after that", "after which", "and afterwards")
#: phrases introducing the base (background) clip of an overlay item
OVERLAY_PHRASES = ("while", "as", "all while", "and in the background")
_SYNTH_SENTENCES = {e.name: e.clause for e in EVENTS}


class CaptionError(ValueError):
    """A base clip has neither captions nor labels."""


def clip_caption(item: ManifestItem) -> str:
    """The caption standing for ``item``: its first non-empty caption, else one made from its labels.

    Raises `CaptionError` naming the item when it has neither."""
    for caption in item.captions:
        if caption.strip():
            return normalise_part(caption, first=True)
    labels = [label for label in item.labels if label.strip()]
    if not labels:
        raise CaptionError(f"base clip {item.id!r} ({item.audio}) has neither captions nor labels")
    return " and ".join(_SYNTH_SENTENCES.get(label.strip(), None) or label_caption(label) for label in labels)


def normalise_part(text: str, first: bool) -> str:
    """``text`` stripped of white space and trailing full stops; lower-cased initial when not ``first``."""
    text = text.strip().rstrip(".").strip()
    if not first and len(text) > 1 and text[0].isupper() and not (text[1].isupper() or text[1] == "."):
        text = text[0].lower() + text[1:]
    return text


def join_captions(parts: list[str], rng: np.random.Generator) -> str:
    """``parts`` in order joined as ``"p0, <phrase> p1, <phrase> p2"`` (phrases drawn from ``rng``)."""
    if not parts:
        raise ValueError("join_captions needs at least one caption")
    out = normalise_part(parts[0], first=True)
    for part in parts[1:]:
        phrase = CONNECTION_PHRASES[int(rng.integers(len(CONNECTION_PHRASES)))]
        out += f", {phrase} {normalise_part(part, first=False)}"
    return out


def overlay_caption(front: str, back: str, base: str, rng: np.random.Generator) -> str:
    """The caption of an overlay item: the front and back events in order, then the base clip."""
    phrase = OVERLAY_PHRASES[int(rng.integers(len(OVERLAY_PHRASES)))]
    return f"{join_captions([front, back], rng)}, {phrase} {normalise_part(base, first=False)}"
