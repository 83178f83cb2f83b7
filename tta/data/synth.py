"""The synthetic captioned dataset: procedural sound events with templated captions.

Each clip holds one event, two or three events in sequence, or events in overlap (a foreground
event over a background one), captioned from templates that name the events and their order
("a bell rings, then a dog barks", "wind blows while a siren wails"). Class frequencies follow a
Zipf law (``zipf`` exponent, 0 = uniform) over the seen classes in `EVENT_CLASSES` order; the
last ``heldout`` classes never occur in train/val/test and form the ``heldout`` split. Everything
is a pure function of the arguments: the same call writes byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX systems
    fcntl = None  # type: ignore[assignment]

from tta.data.audio import save_audio
from tta.data.manifest import ManifestItem, write_manifest

__all__ = ["EVENT_CLASSES", "SYNTH_VERSION", "EventClass", "ensure_synth", "render_event", "synthesize"]

SYNTH_VERSION = 1
SPLITS = ("train", "val", "test", "heldout")
STAMP = ".synth_stamp.json"
TAU = 2 * np.pi
Gen = Callable[[np.random.Generator, int, int], np.ndarray]


def _t(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _env(n: int, sr: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
    """Linear attack/release envelope of ``n`` samples."""
    e = np.ones(n)
    a, r = max(1, min(n // 2, int(attack * sr))), max(1, min(n // 2, int(release * sr)))
    e[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    e[n - r :] = np.minimum(e[n - r :], np.linspace(1.0, 0.0, r))
    return e


def _osc(freq: np.ndarray | float, n: int, sr: int) -> np.ndarray:
    """Phase (radians) of an oscillator with (time-varying) frequency ``freq``."""
    return TAU * np.cumsum(np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))) / sr


def _shaped(rng: np.random.Generator, n: int, sr: int, gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """White noise filtered in the frequency domain by ``gain(freqs)``, unit peak."""
    m = 1 << max(n - 1, 1).bit_length()  # power-of-two FFT (odd/prime lengths are slow)
    spec = np.fft.rfft(rng.standard_normal(m)) * gain(np.fft.rfftfreq(m, 1.0 / sr))
    return _unit(np.fft.irfft(spec, m)[:n])


def _band(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda f: np.exp(-0.5 * (np.log((f + 1.0) / np.sqrt(lo * hi)) / (0.5 * np.log(hi / lo) + 1e-9)) ** 2)


def _unit(x: np.ndarray) -> np.ndarray:
    peak = np.max(np.abs(x)) if x.size else 0.0
    return x / peak if peak > 0 else x


def _hits(n: int, sr: int, times: np.ndarray, kernel: np.ndarray, amps: np.ndarray | None = None) -> np.ndarray:
    """Sum of ``kernel`` copies (faded out over their last 5 ms) at ``times`` (s), cut to ``n`` samples."""
    fade = max(1, min(len(kernel) // 4, int(0.005 * sr)))
    kernel = kernel * np.concatenate([np.ones(len(kernel) - fade), np.linspace(1.0, 0.0, fade)])
    out = np.zeros(n + len(kernel))
    idx = (np.asarray(times) * sr).astype(int)
    amps = np.ones(len(idx)) if amps is None else np.asarray(amps)
    keep = (idx >= 0) & (idx < n)
    idx, amps = (idx[keep], amps[keep]) if keep.any() else (np.zeros(1, dtype=int), np.ones(1))
    for i, a in zip(idx, amps):
        out[i : i + len(kernel)] += a * kernel
    return out[:n]


def _damped(sr: int, freqs: list[float], taus: list[float], dur: float) -> np.ndarray:
    t = _t(max(1, int(dur * sr)), sr)
    return sum(np.sin(TAU * f * t) * np.exp(-t / tau) for f, tau in zip(freqs, taus))


def _times(rng: np.random.Generator, n: int, sr: int, period: float, jitter: float = 0.0) -> np.ndarray:
    """Regular onsets every ``period`` s (at least one), with relative jitter."""
    dur = n / sr
    times = np.arange(0.02 * dur, max(dur - 0.05, 0.021 * dur), period)
    return np.clip(times + rng.uniform(-jitter, jitter, len(times)) * period, 0, None)


def _nyq(sr: int, f: float) -> float:
    return min(f, 0.45 * sr)


def _smooth(gate: np.ndarray, sr: int) -> np.ndarray:
    """A 0/1 gate smoothed over 5 ms (no clicks at its edges)."""
    return np.convolve(gate, np.ones(int(0.005 * sr)) / int(0.005 * sr), mode="same")


def _tone(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    ph = _osc(rng.uniform(300, 1200), n, sr)
    return (np.sin(ph) + 0.1 * np.sin(2 * ph)) * _env(n, sr, 0.02, 0.05)


def _chirp(rng: np.random.Generator, sr: int, n: int, up: bool) -> np.ndarray:
    f0, f1 = rng.uniform(200, 500), _nyq(sr, rng.uniform(1500, 4000))
    f0, f1 = (f0, f1) if up else (f1, f0)
    return np.sin(_osc(f0 * (f1 / f0) ** (np.arange(n) / n), n, sr)) * _env(n, sr, 0.02, 0.05)


def _siren(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    f = rng.uniform(650, 900) + rng.uniform(200, 350) * np.sin(TAU * rng.uniform(0.4, 1.0) * _t(n, sr) - np.pi / 2)
    ph = _osc(f, n, sr)
    return (np.sin(ph) + 0.3 * np.sin(2 * ph) + 0.15 * np.sin(3 * ph)) * _env(n, sr, 0.05, 0.1)


def _white(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    gate, k = np.zeros(n), int(rng.integers(1, 4))
    for j in range(k):
        length = int(n / k * rng.uniform(0.5, 0.85))
        start = int(j * n / k + rng.uniform(0, n / k - length))
        gate[start : start + length] = _env(length, sr, 0.005, 0.03)
    return rng.standard_normal(n) * gate


def _pink(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    return _shaped(rng, n, sr, lambda f: 1.0 / np.sqrt(np.maximum(f, 20.0))) * _env(n, sr, 0.05, 0.2)


def _clicks(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    kernel = rng.standard_normal(int(0.002 * sr)) * np.exp(-_t(int(0.002 * sr), sr) / 0.0005)
    times = _times(rng, n, sr, 1.0 / rng.uniform(8, 20), 0.1)
    return _hits(n, sr, times, kernel, rng.uniform(0.6, 1.0, len(times)))


def _knock(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    kernel = _damped(sr, [rng.uniform(150, 400), rng.uniform(600, 1200)], [0.03, 0.012], 0.15)
    kernel[: int(0.003 * sr)] += rng.standard_normal(int(0.003 * sr)) * 0.5
    k = int(rng.integers(2, 5))
    return _hits(n, sr, 0.02 + min(rng.uniform(0.12, 0.3), 0.9 * n / sr / k) * np.arange(k), kernel)


def _bell(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    f0, t = rng.uniform(300, 800), _t(n, sr)
    ratios = np.array([0.5, 1.0, 1.183, 1.506, 2.0, 2.514, 2.662, 3.011])
    ratios = ratios[ratios * f0 < 0.45 * sr]
    amps, taus = 1.0 / (1 + np.arange(len(ratios))) ** 0.5, 1.6 / ratios**0.7
    x = (amps[:, None] * np.sin(TAU * f0 * ratios[:, None] * t) * np.exp(-t / taus[:, None])).sum(0)
    return x * _env(n, sr, 0.002, 0.05)


def _engine(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t, f0 = _t(n, sr), rng.uniform(30, 70)
    ph = _osc(f0 * (1 + 0.03 * np.sin(TAU * rng.uniform(0.2, 0.6) * t)), n, sr)
    k = np.arange(1, 16)[:, None]
    x = (np.sin(k * ph) / k).sum(0) * (1 + 0.35 * np.sin(TAU * rng.uniform(5, 15) * t))
    return (x + 0.2 * _shaped(rng, n, sr, _band(60, 600))) * _env(n, sr, 0.1, 0.1)


def _rain(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    drops = rng.uniform(0, n / sr, rng.poisson(rng.uniform(150, 450) * n / sr) + 1)
    kernel = rng.standard_normal(int(0.003 * sr)) * np.exp(-_t(int(0.003 * sr), sr) / 0.0008)
    x = _hits(n, sr, drops, kernel, rng.exponential(0.5, len(drops)))
    return (_unit(x) + 0.3 * _shaped(rng, n, sr, _band(1000, 7000))) * _env(n, sr, 0.1, 0.2)


def _beeps(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    length = rng.uniform(0.08, 0.15)
    tone = np.sin(TAU * rng.uniform(1000, 2500) * _t(int(length * sr), sr)) * _env(int(length * sr), sr, 0.005, 0.01)
    return _hits(n, sr, _times(rng, n, sr, length * rng.uniform(2.0, 3.0))[:5], tone)


def _buzz(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    f0, t = rng.uniform(100, 220), _t(n, sr)
    k = np.arange(1, min(24, int(_nyq(sr, 5000) / f0)))[:, None]
    x = (np.sin(k * _osc(f0, n, sr)) / k).sum(0) * (0.7 + 0.3 * np.sin(TAU * rng.uniform(3, 8) * t))
    return x * _env(n, sr, 0.01, 0.03)


def _whistle(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t = _t(n, sr)
    f = rng.uniform(1500, 3000) * (1 + rng.uniform(-0.2, 0.2) * t / t[-1]) * (1 + 0.03 * np.sin(TAU * 6 * t))
    return (np.sin(_osc(f, n, sr)) + 0.05 * _shaped(rng, n, sr, _band(1500, 4000))) * _env(n, sr, 0.05, 0.08)


def _bark(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    m = int(min(rng.uniform(0.12, 0.25), 0.8 * n / sr) * sr)
    f0 = np.linspace(rng.uniform(450, 650), rng.uniform(250, 350), m)
    k = np.arange(1, int(_nyq(sr, 5000) / 250))[:, None]
    f1, f2 = rng.uniform(800, 1200), _nyq(sr, rng.uniform(2000, 2800))
    w = np.exp(-(((k * f0 - f1) / 300) ** 2)) + 0.5 * np.exp(-(((k * f0 - f2) / 400) ** 2))
    bark = (w * np.sin(k * _osc(f0, m, sr))).sum(0) * np.exp(-_t(m, sr) / 0.08) * _env(m, sr, 0.005, 0.01)
    bark += 0.1 * rng.standard_normal(m) * np.exp(-_t(m, sr) / 0.03)
    return _hits(n, sr, _times(rng, n, sr, m / sr + rng.uniform(0.15, 0.35))[:3], bark)


def _drum(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t = _t(m := int(0.4 * sr), sr)
    kernel = np.sin(_osc(rng.uniform(45, 80) + rng.uniform(100, 170) * np.exp(-t / 0.03), m, sr))
    kernel = kernel * np.exp(-t / rng.uniform(0.12, 0.25)) + 0.3 * rng.standard_normal(m) * np.exp(-t / 0.01)
    return _hits(n, sr, _times(rng, n, sr, rng.uniform(0.25, 0.5))[:4], kernel)


def _heart(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    f = rng.uniform(60, 80)
    lub = _damped(sr, [f, 2.1 * f], [0.04, 0.02], 0.15)
    dub = _damped(sr, [1.2 * f, 2.5 * f], [0.03, 0.015], 0.12)
    beats = _times(rng, n, sr, 60.0 / rng.uniform(55, 95))
    return _hits(n, sr, beats, lub) + 0.7 * _hits(n, sr, beats + rng.uniform(0.25, 0.3), dub)


def _slow_curve(rng: np.random.Generator, n: int, sr: int, step: float) -> np.ndarray:
    pts = rng.uniform(0.2, 1.0, int(n / sr / step) + 2)
    return np.interp(np.arange(n), np.linspace(0, n, len(pts)), pts)


def _wind(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    lo = rng.uniform(150, 300)
    return _shaped(rng, n, sr, _band(lo, lo * rng.uniform(3, 6))) * _slow_curve(rng, n, sr, 0.3) * _env(n, sr, 0.2, 0.3)


def _alarm(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    f1, t = rng.uniform(800, 1000), _t(n, sr)
    ph = _osc(np.where(np.sin(TAU * rng.uniform(3, 6) * t) >= 0, f1, f1 * 1.25), n, sr)
    return (np.sin(ph) + np.sin(3 * ph) / 3) * _env(n, sr, 0.01, 0.03)


def _phone(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    fa, fb = (400.0, 450.0) if rng.random() < 0.5 else (440.0, 480.0)
    t = _t(n, sr)
    gate = _smooth(((t % 2.0 < 0.4) | ((t % 2.0 > 0.6) & (t % 2.0 < 1.0))).astype(float), sr)
    x = (np.sin(TAU * fa * t) + np.sin(TAU * fb * t)) * (0.6 + 0.4 * np.sin(TAU * 20 * t))
    return x * gate * _env(n, sr, 0.005, 0.02)


def _drip(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t = _t(m := int(0.08 * sr), sr)
    f = rng.uniform(600, 1200) * (1 + rng.uniform(1, 2) * (1 - np.exp(-t / 0.01)))
    kernel = np.sin(_osc(f, m, sr)) * np.exp(-t / 0.025)
    times = np.cumsum(rng.uniform(0.15, 0.5, int(n / sr / 0.15) + 1)) - 0.1
    return _hits(n, sr, times, kernel)


def _clock(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    f = _nyq(sr, rng.uniform(2500, 4000))
    tick, tock = _damped(sr, [f], [0.003], 0.02), _damped(sr, [0.8 * f], [0.003], 0.02)
    times = _times(rng, n, sr, 1.0 / rng.uniform(2, 4))
    return _hits(n, sr, times[::2], tick) + _hits(n, sr, times[1::2], tock)


def _bird(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    m, hi, lo = int(rng.uniform(0.04, 0.09) * sr), _nyq(sr, rng.uniform(4500, 6500)), rng.uniform(2500, 3500)
    f = np.linspace(hi, lo, m) if rng.random() < 0.5 else np.linspace(lo, hi, m)
    syl = np.sin(_osc(f, m, sr)) * np.sin(np.pi * np.arange(m) / m) ** 2
    times = _times(rng, n, sr, 1.0 / rng.uniform(5, 10), 0.3)
    return _hits(n, sr, times, syl, rng.uniform(0.5, 1.0, len(times)))


def _applause(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    m = int(0.008 * sr)
    clap = _shaped(rng, m, sr, _band(800, 4000)) * np.exp(-_t(m, sr) / 0.002)
    times = rng.uniform(0, n / sr, rng.poisson(rng.uniform(40, 100) * n / sr) + 1)
    x = _hits(n, sr, times, clap, rng.uniform(0.3, 1.0, len(times)))
    return (_unit(x) + 0.2 * _shaped(rng, n, sr, _band(800, 4000))) * _env(n, sr, 0.1, 0.2)


def _cricket(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t = _t(n, sr)
    pulses = np.maximum(np.sin(TAU * rng.uniform(25, 50) * t), 0) ** 2
    trill = rng.uniform(0.2, 0.5)
    gate = _smooth((t % (trill + rng.uniform(0.1, 0.3)) < trill).astype(float), sr)
    return np.sin(TAU * _nyq(sr, rng.uniform(4000, 5000)) * t) * pulses * gate * _env(n, sr, 0.01, 0.02)


def _horn(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    fa, m = rng.uniform(380, 440), int(min(rng.uniform(0.3, 0.8), 0.45 * n / sr) * sr)
    t, k = _t(m, sr), np.arange(1, 9)[:, None]
    honk = ((np.sin(k * TAU * fa * t) + np.sin(k * TAU * fa * 1.26 * t)) / k).sum(0) * _env(m, sr, 0.01, 0.03)
    return _hits(n, sr, np.array([0.02, 0.02 + m / sr + rng.uniform(0.1, 0.3)]), honk)


def _steps(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    m = int(0.1 * sr)
    step = _damped(sr, [rng.uniform(80, 120)], [0.03], 0.1)
    step += 0.3 * _shaped(rng, m, sr, _band(1000, 4000)) * np.exp(-_t(m, sr) / 0.04)
    return _hits(n, sr, _times(rng, n, sr, 1.0 / rng.uniform(1.6, 2.4), 0.05), step)


def _thunder(rng: np.random.Generator, sr: int, n: int) -> np.ndarray:
    t = _t(n, sr)
    crack = rng.standard_normal(n) * np.exp(-t / 0.08)
    rumble = _shaped(rng, n, sr, _band(30, 200)) * np.exp(-t / rng.uniform(0.8, 1.5)) * _slow_curve(rng, n, sr, 0.2)
    return (0.5 * crack + rumble) * _env(n, sr, 0.005, 0.2)


@dataclass(frozen=True)
class EventClass:
    """A procedural event class: name (label), clause and noun phrase used in captions."""

    name: str
    clause: str
    noun: str
    generate: Gen


EVENTS: tuple[EventClass, ...] = tuple(
    EventClass(*spec) for spec in (
        ("tone", "a steady tone sounds", "a steady tone", _tone),
        ("chirp_up", "a tone sweeps upward", "a rising tone", lambda r, s, n: _chirp(r, s, n, True)),
        ("chirp_down", "a tone sweeps downward", "a falling tone", lambda r, s, n: _chirp(r, s, n, False)),
        ("siren", "a siren wails", "a wailing siren", _siren),
        ("white_noise", "white noise hisses", "a burst of white noise", _white),
        ("pink_noise", "a soft noise rushes", "a burst of pink noise", _pink),
        ("clicks", "something clicks rapidly", "rapid clicking", _clicks),
        ("knock", "someone knocks on a door", "knocking on a door", _knock),
        ("bell", "a bell rings", "a ringing bell", _bell),
        ("engine", "an engine hums", "a humming engine", _engine),
        ("rain", "rain falls", "falling rain", _rain),
        ("beeps", "a device beeps", "electronic beeps", _beeps),
        ("buzz", "a buzzer buzzes", "a loud buzz", _buzz),
        ("whistle", "someone whistles", "a whistle", _whistle),
        ("dog_bark", "a dog barks", "a barking dog", _bark),
        ("drum", "a drum is struck", "drum hits", _drum),
        ("heartbeat", "a heart beats", "a beating heart", _heart),
        ("wind", "wind blows", "blowing wind", _wind),
        ("alarm", "an alarm goes off", "a blaring alarm", _alarm),
        ("telephone", "a telephone rings", "a ringing telephone", _phone),
        ("water_drip", "water drips", "dripping water", _drip),
        ("clock_tick", "a clock ticks", "a ticking clock", _clock),
        ("bird_chirp", "a bird chirps", "a chirping bird", _bird),
        ("applause", "people applaud", "applause", _applause),
        ("cricket", "a cricket chirps", "chirping crickets", _cricket),
        ("car_horn", "a car horn honks", "a honking car horn", _horn),
        ("footsteps", "someone walks", "footsteps", _steps),
        ("thunder", "thunder rumbles", "rumbling thunder", _thunder),
    )
)
EVENT_CLASSES: list[str] = [e.name for e in EVENTS]
_BY_NAME = {e.name: e for e in EVENTS}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("{A}", "the sound of {a}", "{a} can be heard"),
    "sequence2": ("{A}, then {B}", "{A}, followed by {b}", "first {A}, and then {B}", "{a} followed by {b}"),
    "sequence3": ("{A}, then {B}, then {C}", "{a}, then {b}, and finally {c}", "first {A}, then {B}, and then {C}"),
    "overlap2": ("{A} while {B}", "{a} and {b} at the same time", "{a} over {b}", "{A} as {B} in the background"),
    "overlap3": ("{A}, then {B}, while {C}", "{a} followed by {b}, with {c} in the background"),
}


def render_event(name: str, rng: np.random.Generator, sample_rate: int, num_samples: int) -> np.ndarray:
    """One event of class ``name``: ``num_samples`` float64 samples with peak 1."""
    x = _unit(_BY_NAME[name].generate(rng, sample_rate, num_samples))
    if not np.any(x):
        raise RuntimeError(f"synthetic event {name!r} rendered silence ({num_samples} samples at {sample_rate} Hz)")
    return x


def _captions(kind: str, names: list[str], rng: np.random.Generator) -> list[str]:
    ev = [_BY_NAME[n] for n in names]
    fields = {k: e.clause for k, e in zip("ABC", ev)} | {k: e.noun for k, e in zip("abc", ev)}
    templates = TEMPLATES[kind]
    k = int(rng.integers(1, min(3, len(templates)) + 1))
    return [templates[i].format(**fields) for i in sorted(rng.choice(len(templates), size=k, replace=False))]


def _layout(kind: str, k: int, n: int, rng: np.random.Generator) -> list[tuple[int, int, float]]:
    """``(start, length, gain)`` per event, in caption order."""
    if kind == "single":
        length = int(rng.uniform(0.5, 0.95) * n)
        return [(int(rng.uniform(0, n - length)), length, 1.0)]
    n_seq = k if kind.startswith("sequence") else k - 1
    out: list[tuple[int, int, float]] = []
    if n_seq == 1:  # overlap2: foreground A over background B
        length = int(rng.uniform(0.4, 0.7) * n)
        out.append((int(rng.uniform(0.1 * n, n - length)), length, 1.0))
    else:
        slot = n / n_seq
        for j in range(n_seq):
            length = int(rng.uniform(0.6, 0.9) * slot)
            out.append((int(j * slot + rng.uniform(0, slot - length)), length, float(rng.uniform(0.6, 1.0))))
    if kind.startswith("overlap"):
        length = int(rng.uniform(0.85, 1.0) * n)
        out.append((int(rng.uniform(0, n - length)), length, float(rng.uniform(0.3, 0.6))))
    return out


def _plan_classes(
    rng: np.random.Generator, split: str, k: int, seen: list[str], probs: np.ndarray, held: list[str]
) -> list[str]:
    """``k`` distinct classes drawn by frequency; a heldout clip holds one held-out class."""
    names = [str(c) for c in rng.choice(seen, size=k if split != "heldout" else k - 1, replace=False, p=probs)]
    if split == "heldout":
        names.insert(int(rng.integers(0, k)), held[int(rng.integers(0, len(held)))])
    return names


def _split_sizes(n: int, heldout: int) -> dict[str, int]:
    n_held = 0 if heldout == 0 else max(1 if n >= 5 else 0, round(0.1 * n))
    n_seen = n - n_held
    n_val = round(0.1 * n_seen) if n_seen >= 5 else 0
    return {"train": n_seen - 2 * n_val, "val": n_val, "test": n_val, "heldout": n_held}


def synthesize(
    out_dir: str | os.PathLike, n: int, seed: int, sample_rate: int = 16000, duration: float = 4.0,
    zipf: float = 1.0, heldout: int = 4,
) -> Path:  # fmt: skip
    """Write ``n`` clips to ``out_dir/audio/`` plus ``manifest.jsonl`` and ``classes.json``.

    Returns the manifest path. Splits: 10 % held-out (clips containing a held-out class), then
    10 % val, 10 % test, the rest train. Raises ValueError for invalid arguments.
    """
    n_classes = len(EVENTS)
    if n < 1 or seed < 0 or duration <= 0 or sample_rate < 8000 or zipf < 0 or not 0 <= heldout <= n_classes - 3:
        raise ValueError(
            f"invalid synth arguments: n={n} (>= 1), seed={seed} (>= 0), duration={duration} (> 0), "
            f"sample_rate={sample_rate} (>= 8000), zipf={zipf} (>= 0), heldout={heldout} (0..{n_classes - 3})"
        )
    out_dir = Path(out_dir)
    num = int(round(duration * sample_rate))
    seen, held = EVENT_CLASSES[: n_classes - heldout], EVENT_CLASSES[n_classes - heldout :]
    probs = (w := 1.0 / np.arange(1, len(seen) + 1) ** zipf) / w.sum()
    sizes = _split_sizes(n, heldout)
    order = np.random.default_rng([seed, 0]).permutation(n)
    split_of = np.empty(n, dtype=object)
    split_of[order] = [s for s in SPLITS for _ in range(sizes[s])]
    counts = {c: {s: 0 for s in SPLITS} for c in EVENT_CLASSES}
    items: list[ManifestItem] = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        split = str(split_of[i])
        k = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        kind = "single" if k == 1 else ("sequence" if rng.random() < 0.6 else "overlap") + str(k)
        names = _plan_classes(rng, split, k, seen, probs, held)
        mix = np.zeros(num)
        for name, (start, length, gain) in zip(names, _layout(kind, k, num, rng)):
            mix[start : start + length] += gain * render_event(name, rng, sample_rate, max(length, 1))
            counts[name][split] += 1
        mix *= 10 ** (rng.uniform(-6.0, -1.0) / 20) / np.max(np.abs(mix))
        clip_id = f"synth_{i:05d}"
        path = save_audio(out_dir / "audio" / f"{clip_id}.wav", mix, sample_rate)
        meta = {"composition": kind.rstrip("23")}
        caps = _captions(kind, names, rng)
        items.append(ManifestItem(clip_id, path.absolute(), caps, names, num / sample_rate, sample_rate, split, meta))
    keep = {f"{it.id}.wav" for it in items}
    for stale in [p for p in sorted((out_dir / "audio").glob("synth_*.wav")) if p.name not in keep]:
        stale.unlink()
    classes = [
        {"name": e.name, "caption": e.clause, "rank": r, "heldout": e.name in held, "counts": counts[e.name]}
        for r, e in enumerate(EVENTS)
    ]
    info = {"version": SYNTH_VERSION, "splits": sizes, "classes": classes}
    (out_dir / "classes.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return write_manifest(items, out_dir / "manifest.jsonl")


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on ``out_dir`` (parallel ranks generate once; POSIX only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".synth.lock", "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed
        yield


def ensure_synth(
    out_dir: str | os.PathLike, n: int, seed: int, sample_rate: int = 16000, duration: float = 4.0,
    zipf: float = 1.0, heldout: int = 4,
) -> Path:  # fmt: skip
    """`synthesize` unless ``out_dir`` already holds a complete dataset made with the same
    arguments (recorded in a stamp file written last). Returns the manifest path."""
    out_dir = Path(out_dir)
    args = dict(n=n, seed=seed, sample_rate=sample_rate, duration=float(duration), zipf=float(zipf), heldout=heldout)
    want: dict[str, Any] = {"version": SYNTH_VERSION, "args": args}
    stamp, manifest = out_dir / STAMP, out_dir / "manifest.jsonl"
    with _locked(out_dir):
        if stamp.is_file() and manifest.is_file():
            try:
                have = json.loads(stamp.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                have = None
            if have == want and all((out_dir / "audio" / f"synth_{i:05d}.wav").is_file() for i in range(n)):
                return manifest
        stamp.unlink(missing_ok=True)
        path = synthesize(out_dir, **args)
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(want, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, stamp)
        return path
