"""Spectrogram figures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch

from tta.data.mel import MelConfig


def safe_name(clip_id: str) -> str:
    """A clip id usable as a file name (ids may contain ``/``, e.g. WavCaps and folder ids)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in clip_id)


def save_spectrograms(path: str | Path, mels: dict[str, torch.Tensor], config: MelConfig) -> Path:
    """Plot log-mels ``{title: (n_mels, frames)}`` one above the other with a shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = [(k, v.detach().float().cpu()) for k, v in mels.items()]
    vmin = min(float(v.min()) for _, v in items)
    vmax = max(float(v.max()) for _, v in items)
    fig, axes = plt.subplots(len(items), 1, figsize=(8, 2.2 * len(items)), squeeze=False, layout="constrained")
    for ax, (title, mel) in zip(axes[:, 0], items):
        seconds = mel.shape[-1] * config.hop_length / config.sample_rate
        im = ax.imshow(mel.numpy(), origin="lower", aspect="auto", vmin=vmin, vmax=vmax,
                       extent=(0.0, seconds, 0, mel.shape[0]), cmap="magma")
        ax.set_title(title)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("time (s)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="log-mel")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
