"""Data-loading throughput: tta (soundfile + torchaudio resample + MelFrontend) vs librosa.

Makes ``--n`` synthetic clips at ``--source-sr`` (stereo by default, so the mixdown is part of
the work), then measures clips/s for load + resample to 16 kHz + log-mel with

- ours: ``tta.data.audio.load_audio`` + ``tta.data.mel.MelFrontend`` (preset ``audioldm``);
- librosa: ``librosa.load(sr=16000)`` + ``librosa.feature.melspectrogram`` with the same STFT /
  mel parameters (reflect padding ``(n_fft - hop) / 2``, no centring, magnitude, slaney mels),

and the time of one epoch reading cached mels (``.npy`` per clip) vs computing them.
Run: ``python bench/data_throughput.py --n 200``. Results are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from tta.data.audio import load_audio
from tta.data.manifest import read_manifest
from tta.data.mel import MelFrontend
from tta.data.synth import synthesize


def make_clips(root: Path, n: int, source_sr: int, duration: float, channels: int) -> list[Path]:
    """Synthetic clips at ``source_sr``; converted to ``channels`` channels (PCM 16)."""
    manifest = synthesize(root, n=n, seed=0, sample_rate=source_sr, duration=duration)
    paths = [item.audio for item in read_manifest(manifest)]
    if channels > 1:
        for i, path in enumerate(paths):
            data, sr = sf.read(path, dtype="float32")
            gains = np.linspace(1.0, 0.6, channels)[None, :] if i % 2 else np.linspace(0.6, 1.0, channels)[None, :]
            sf.write(path, data[:, None] * gains, sr, subtype="PCM_16")
    return paths


def timed(fns: list[Callable[[Path], object]], paths: list[Path], repeats: int) -> list[float]:
    """Best wall time of a pass of each ``fn`` over ``paths``; passes interleaved, so that a
    change of machine load affects all candidates alike (after one warm-up call each)."""
    for fn in fns:
        fn(paths[0])
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for p in paths:
                fn(p)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="number of clips")
    parser.add_argument("--source-sr", type=int, default=44100)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (best is kept)")
    args = parser.parse_args()

    import librosa  # only needed for the reference

    torch.set_num_threads(args.threads)
    fe = MelFrontend("audioldm")
    cfg = fe.config
    pad = (cfg.n_fft - cfg.hop_length) // 2

    def ours(path: Path) -> torch.Tensor:
        wav, _ = load_audio(path, target_sr=cfg.sample_rate)
        return fe(wav)

    def reference(path: Path) -> np.ndarray:
        y, _ = librosa.load(path, sr=cfg.sample_rate, mono=True)
        y = np.pad(y, (pad, pad), mode="reflect")
        mel = librosa.feature.melspectrogram(
            y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
            window="hann", center=False, power=1.0, n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max,
            norm="slaney", htk=False,
        )  # fmt: skip
        return np.log(np.maximum(mel, cfg.log_floor))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = make_clips(root / "clips", args.n, args.source_sr, args.duration, args.channels)
        print(f"made {len(paths)} clips ({args.duration:g} s, {args.source_sr} Hz, {args.channels} ch) "
              f"in {time.perf_counter() - t0:.1f} s; {args.threads} threads")

        a, b = ours(paths[0])[0].numpy(), reference(paths[0])
        frames = min(a.shape[1], b.shape[1])
        print(f"mel shapes ours {a.shape} librosa {b.shape}; mean |diff| of log-mels "
              f"{np.abs(a[:, :frames] - b[:, :frames]).mean():.3f} (resamplers differ: torchaudio sinc vs soxr)")

        t_ours, t_ref = timed([ours, reference], paths, args.repeats)
        print(f"load+resample+mel  ours   : {len(paths) / t_ours:8.1f} clips/s ({t_ours:.2f} s)")
        print(f"load+resample+mel  librosa: {len(paths) / t_ref:8.1f} clips/s ({t_ref:.2f} s)")
        print(f"speed ratio ours/librosa  : {t_ref / t_ours:8.2f}x")

        cache = root / "cache"
        cache.mkdir()
        cached = {p: cache / f"{p.stem}.npy" for p in paths}
        for p, c in cached.items():
            np.save(c, ours(p)[0].numpy())

        def from_cache(path: Path) -> torch.Tensor:
            return torch.from_numpy(np.load(cached[path]))

        t_uncached, t_cached = timed([ours, from_cache], paths, args.repeats)
        print(f"epoch uncached (compute mels): {t_uncached:.3f} s")
        print(f"epoch cached (.npy mels)      : {t_cached:.3f} s")
        print(f"speed ratio cached/uncached   : {t_uncached / t_cached:8.1f}x")


if __name__ == "__main__":
    main()
