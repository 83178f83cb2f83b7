"""`RetrievalConditioner`: Re-AudioLDM's cross-attention context of retrieved text-audio pairs.

For each generated clip, k neighbours are chosen -- from the precomputed neighbour table during
training (the target clip is never its own neighbour), or by querying the FAISS index with the
prompt's CLAP text embedding at test time. Their cached features (`tta.retrieval.features`:
an audio feature sequence, e.g. AudioMAE, and a caption embedding sequence, e.g. T5 of length
50) are projected to ``context_dim`` and concatenated along the sequence:

    context = [A(n_1) ; T(n_1) ; A(n_2) ; T(n_2) ; ... ]   with its padding mask

``mode`` selects the paper's ablations: ``"both"``, ``"audio"`` only or ``"text"`` only. ``k = 0``
gives an empty context (plain AudioLDM). Files are opened lazily on first use, so a config can be
instantiated (and checked) on a machine without the datastore when the dims are given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.generators.conditioning.base import Conditioner
from tta.generators.ldm.conditioning import RetrievalMode
from tta.registry import register

log = logging.getLogger(__name__)

CONTEXT_NAME = "retrieval"


def _dims(store: Any) -> dict[str, int | None]:
    return {m: store.dim(m) if store.has(m) else None for m in ("audio", "text")}


@register("conditioner", "retrieval_conditioner")
class RetrievalConditioner(Conditioner):
    """Neighbour ids -> ``(context (B, L, context_dim), mask (B, L))`` for the ``"retrieval"`` context.

    Reads ``neighbours`` (k datastore ids per clip); its null is the empty context (all-False mask).

    Args:
        features: directory of the neighbour feature store (`tta.retrieval.features.FeatureStore`).
        index: directory written by ``tta index build`` (FAISS index + ``neighbours.npz``).
        k: neighbours used per clip (3 or 10 in the paper; 0 disables retrieval).
        mode: ``"both"``, ``"audio"`` or ``"text"`` features of each neighbour.
        context_dim: width of the projected context (the UNet's ``context_dims["retrieval"]``).
        audio_dim, text_dim: widths of the stored features; read from the store when None, and
            checked against it when given.
        dropout: classifier-free-guidance dropout (None: the model's ``cfg_dropout``).
    """

    route = "context"
    reads = ("neighbours",)

    def __init__(
        self,
        features: str,
        index: str | None = None,
        k: int = 3,
        mode: RetrievalMode = "both",
        context_dim: int = 768,
        audio_dim: int | None = None,
        text_dim: int | None = None,
        dropout: float | None = None,
    ) -> None:
        super().__init__(dropout)
        if mode not in ("both", "audio", "text"):
            raise ValueError(f"retrieval mode must be 'both', 'audio' or 'text', got {mode!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.features_dir, self.index_dir = str(features), None if index is None else str(index)
        self.k, self.mode, self.context_dim = int(k), mode, int(context_dim)
        self.dim = self.context_dim
        self._store: Any = None
        self._index: Any = None
        self._table: Any = None
        self.audio_dim, self.text_dim = audio_dim, text_dim
        if (mode != "text" and audio_dim is None) or (mode != "audio" and text_dim is None):
            dims = _dims(self.store)  # opening the store checks the widths that were given
            self.audio_dim = dims["audio"] if audio_dim is None else audio_dim
            self.text_dim = dims["text"] if text_dim is None else text_dim
        audio_dim, text_dim = self.audio_dim, self.text_dim
        self.audio_proj = nn.Linear(int(audio_dim), context_dim) if mode in ("both", "audio") else None
        self.text_proj = nn.Linear(int(text_dim), context_dim) if mode in ("both", "text") else None

    # ------------------------------------------------------------------ files (lazy)
    @property
    def store(self) -> Any:
        """The feature store (opened on first use; dims checked against the projections)."""
        if self._store is None:
            from tta.retrieval.features import FeatureStore

            store = FeatureStore.open(self.features_dir)
            dims = _dims(store)
            for name in ("audio", "text"):
                want = getattr(self, f"{name}_dim", None)
                if self.uses(name) and want is not None and dims.get(name) != want:
                    raise ValueError(
                        f"feature store {self.features_dir} holds {name} features of width {dims.get(name)}, "
                        f"but the retrieval conditioner was built for {want}"
                    )
                if self.uses(name) and dims.get(name) is None:
                    raise ValueError(f"feature store {self.features_dir} has no {name} features (mode {self.mode!r})")
            self._store = store
        return self._store

    def uses(self, kind: str) -> bool:
        """Whether ``kind`` (``"audio"``/``"text"``) features enter the context."""
        return self.mode == "both" or self.mode == kind

    @property
    def table(self) -> Any:
        """The training neighbour table (``neighbours.npz`` of the index directory)."""
        if self._table is None:
            from tta.retrieval.neighbours import NeighbourTable

            if self.index_dir is None:
                raise ValueError("the retrieval conditioner needs `index` (a `tta index build` directory)")
            self._table = NeighbourTable.load(self.index_dir)
            if self._table.k < self.k:
                raise ValueError(f"neighbour table in {self.index_dir} keeps {self._table.k} neighbours, k={self.k}")
        return self._table

    @property
    def index(self) -> Any:
        """The FAISS index queried at test time."""
        if self._index is None:
            from tta.retrieval.index import EmbeddingIndex

            if self.index_dir is None:
                raise ValueError("the retrieval conditioner needs `index` (a `tta index build` directory)")
            self._index = EmbeddingIndex.load(Path(self.index_dir))
        return self._index

    def use_index(self, index: str) -> None:
        """Retrieve from another ``tta index build`` directory at test time (same CLAP space)."""
        self.index_dir, self._index, self._table = str(index), None, None

    # -------------------------------------------------------------- neighbour choice
    def training_neighbours(self, ids: Sequence[str]) -> list[list[str]]:
        """The first k table neighbours of each training clip, never the clip itself."""
        out = []
        for clip in ids:
            if clip not in self.table:
                raise KeyError(
                    f"clip {clip!r} has no row in the neighbour table of {self.index_dir}; rebuild it with "
                    "`tta index build` over the training manifest"
                )
            chosen = [n for n, _ in self.table[clip] if n != clip][: self.k]
            if len(chosen) < self.k:
                raise ValueError(f"clip {clip!r} has only {len(chosen)} neighbours, k={self.k}")
            out.append(chosen)
        return out

    def query_neighbours(self, text_embeddings: torch.Tensor,
                         exclude: Sequence[set[str]] | None = None) -> list[list[str]]:
        """Top-k datastore clips for each prompt embedding (test time)."""
        if self.k == 0:
            return [[] for _ in range(text_embeddings.shape[0])]
        ids, _ = self.index.retrieve(text_embeddings.detach().float().cpu().numpy(), self.k, exclude)
        return ids

    # ---------------------------------------------------------------------- context
    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Context ``(B, L, context_dim)`` and mask ``(B, L)`` (True = real token) of the neighbours."""
        neighbours: Sequence[Sequence[str]] = inputs["neighbours"]
        batch = len(neighbours)
        counts = {len(n) for n in neighbours}
        if len(counts) > 1:
            raise ValueError(f"every clip needs the same number of neighbours, got counts {sorted(counts)}")
        k = counts.pop() if counts else 0
        if k == 0:
            return torch.zeros(batch, 0, self.context_dim, device=device), torch.zeros(batch, 0, dtype=torch.bool,
                                                                                        device=device)
        feats = self.store.lookup(neighbours)
        parts, masks = [], []
        for kind, proj in (("audio", self.audio_proj), ("text", self.text_proj)):
            if proj is None:
                continue
            seq = feats[kind].to(device=device, dtype=proj.weight.dtype)  # (B, k, L, D)
            parts.append(proj(seq))
            masks.append(feats[f"{kind}_mask"].to(device))
        seq = torch.cat(parts, dim=2).flatten(1, 2)  # neighbour-major: [A1 T1 A2 T2 ...]
        return seq, torch.cat(masks, dim=2).flatten(1, 2).bool()
