"""The retrieval datastore must not hold evaluation audio.

Re-AudioLDM conditions every training step on the audio of retrieved neighbours; a datastore
(FAISS index + feature store) that holds validation, test or held-out clips would put their audio
into training. `check_datastore` compares the datastore's ids with the non-training items of the
training manifest and refuses any overlap, naming the index, the splits and example ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tta.data.manifest import read_manifest

__all__ = ["DatastoreLeakError", "check_datastore"]


class DatastoreLeakError(ValueError):
    """The retrieval datastore holds clips of a split that training must not see."""


def check_datastore(datastore_ids: Iterable[str], manifest: str | os.PathLike, train_split: str,
                    where: str) -> int:
    """Raise `DatastoreLeakError` when a clip of ``manifest`` outside ``train_split`` is in the
    datastore (``where`` names it in the message); return how many datastore ids the manifest's
    training split holds."""
    stored = set(datastore_ids)
    leaks: dict[str, list[str]] = {}
    in_train = 0
    for item in read_manifest(Path(manifest)):
        if item.id not in stored:
            continue
        if item.split == train_split:
            in_train += 1
        else:
            leaks.setdefault(str(item.split), []).append(item.id)
    if leaks:
        detail = "; ".join(f"{len(ids)} of split {split!r} (e.g. {', '.join(repr(i) for i in ids[:3])})"
                           for split, ids in sorted(leaks.items()))
        raise DatastoreLeakError(
            f"retrieval datastore {where} holds clips that training must not see: {detail} of {manifest}. "
            f"Rebuild it from the training split only: tta index build --splits {train_split} "
            f"(and the feature store over the same split)"
        )
    return in_train
