"""Is this CLAP the one an index was built with? Content hashes of its towers, recorded and checked.

`clap_content_hashes` hashes each tower's weights (`tta.utils.weights.state_hash`), so the same
CLAP matches whether it comes from a ``clap_trainer`` checkpoint, a pipeline folder or the demo; an
index records them as ``meta["embedding_content"]`` and `check_embedding_content` refuses a CLAP
whose towers differ (``tta index search``, ``tta generate --index``).
"""

from __future__ import annotations

from typing import Any

from tta.retrieval.index import CONTENT_KEY, HASH_KEY, IndexMismatchError

__all__ = ["CONTENT_KEY", "check_embedding_content", "clap_content_hashes"]


def clap_content_hashes(clap: Any) -> dict[str, str]:
    """`tta.utils.weights.state_hash` of each tower (encoder + projection) a CLAP has: ``audio``
    (built the stored vectors), ``text`` (embeds the queries); recorded as ``meta["embedding_content"]``."""
    from tta.utils.weights import state_hash

    return {side: state_hash(getattr(clap, f"{side}_encoder"), getattr(clap, f"{side}_projection"))
            for side in ("audio", "text") if getattr(clap, f"{side}_encoder", None) is not None}


def check_embedding_content(meta: dict[str, Any], hashes: dict[str, str], where: str, what: str) -> None:
    """Refuse (`IndexMismatchError`, naming both) a CLAP ``what`` whose tower hashes differ from the
    ones the index at ``where`` recorded, or an index that recorded none."""
    recorded = meta.get(CONTENT_KEY) or {}
    common = sorted(set(recorded) & set(hashes))
    if not common:
        raise IndexMismatchError(f"index {where} records no content hash of its embedding model (embedding_model: "
                                 f"{meta.get(HASH_KEY)!r}), so {what} cannot be checked against it; rebuild it "
                                 "with `tta index build`")
    for side in common:
        if recorded[side] != hashes[side]:
            raise IndexMismatchError(f"index {where} was built with another CLAP than {what}: {side} tower "
                                     f"{recorded[side][:12]}… (index) != {hashes[side][:12]}… ({what}); query it "
                                     "with the CLAP that built it or rebuild it with `tta index build --clap`")
