"""Real synthetic speech: eSpeak NG (the ``espeakng-loader`` wheel bundles the library and
its voice data) driven through ctypes, and a Speech Commands-format keyword folder."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.errors import OmniPeftError

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_RATE, ESPEAK_VOLUME, ESPEAK_PITCH = 1, 2, 3
POS_CHARACTER, ESPEAK_CHARS_AUTO = 1, 0
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_LOCK = threading.Lock()

# The demo's 16 eSpeak NG voices: four English accents x four voice variants, ordered so
# that the last voices (validation and test speakers) are each an accent and a variant heard
# in training, but never that combination. Variants without eSpeak's random breath noise
# (not f2, f3, f5), so every run synthesises the same clips.
DEMO_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-029")
DEMO_VARIANTS = ("m1", "f1", "m3", "f4")
DEMO_VOICES = tuple(f"{DEMO_ACCENTS[i % 4]}+{DEMO_VARIANTS[(i + i // 4) % 4]}" for i in range(16))


class SpeechError(OmniPeftError, RuntimeError):
    """eSpeak NG is missing or failed."""


class ESpeak:
    """One eSpeak NG engine in synchronous mode; ``say`` returns float32 samples in [-1, 1]."""

    _instance: ESpeak | None = None

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ModuleNotFoundError:
            raise SpeechError(
                "eSpeak NG is needed to synthesise the demo's keywords: pip install "
                "espeakng-loader (the wheel bundles libespeak-ng and its voice data)."
            ) from None
        self.lib = ctypes.cdll.LoadLibrary(str(espeakng_loader.get_library_path()))
        data = str(Path(espeakng_loader.get_data_path()).parent).encode()
        rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate <= 0:
            raise SpeechError(f"espeak_Initialize failed ({rate}) with data folder {data!r}.")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the engine
        self.lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> ESpeak:
        """The process's engine (eSpeak NG keeps global state: one per process)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, count: int, events) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def say(self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """Synthesise ``text`` with ``voice`` (e.g. "en", "en-us", "en+f3"), ``rate`` in
        words per minute and ``pitch`` in 0..100."""
        with _LOCK:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise SpeechError(f"eSpeak NG has no voice {voice!r}.")
            self.lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
            self._chunks = []
            raw = text.encode()
            status = self.lib.espeak_Synth(
                raw, len(raw) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_AUTO, None, None
            )
            if status != 0:
                raise SpeechError(f"espeak_Synth failed ({status}) on {text!r}.")
            samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768.0


def fit_to_second(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Trim silence, then place the word at a random offset in exactly one second."""
    loud = np.flatnonzero(np.abs(wave) > 0.01)
    if loud.size:
        wave = wave[loud[0] : loud[-1] + 1]
    wave = wave[:rate]
    out = np.zeros(rate, np.float32)
    start = int(rng.integers(0, rate - len(wave) + 1))
    out[start : start + len(wave)] = wave
    return out


def write_keyword_folder(
    root: str | Path,
    words: Sequence[str],
    *,
    voices: Sequence[str] = ("en", "en-us", "en+f4", "en+m3", "en-gb-x-rp"),
    rates: Sequence[int] = (130, 170, 210),
    pitches: Sequence[int] = (30, 50, 75),
    noise_db: float = -30.0,
    held_out: int = 1,
    seed: int = 0,
) -> Path:
    """A Speech Commands v2-format folder of spoken ``words``: ``<word>/<speaker>_nohash_<i>.wav``
    (1 s, 16 kHz, 16-bit), one "speaker" per voice, and ``validation_list.txt`` /
    ``testing_list.txt`` splitting by speaker as the real dataset does (the last ``held_out``
    voices: test, the ``held_out`` before them: validation), plus a ``_background_noise_``
    folder. Voice variants with breath noise (``+f2``, ``+f3``, ``+f5``) differ from run to
    run; the others synthesise the same samples every time."""
    import soundfile

    if not (held_out >= 1 and 2 * held_out < len(voices)):
        raise SpeechError(
            f"held_out={held_out} voices each for validation and test leaves no training voice "
            f"of {len(voices)}; give more voices or a smaller held_out."
        )
    engine = ESpeak.get()
    rng = np.random.default_rng(seed)
    root = Path(root)
    val, test = [], []
    for word in words:
        (root / word).mkdir(parents=True, exist_ok=True)
        for s, voice in enumerate(voices):
            speaker = f"{s:08x}"
            for i, (rate, pitch) in enumerate((r, p) for r in rates for p in pitches):
                wave = engine.say(word, voice=voice, rate=rate, pitch=pitch)
                wave = _to_16k(wave, engine.sample_rate)
                wave = fit_to_second(wave, 16000, rng)
                wave = wave + rng.normal(0, 10 ** (noise_db / 20), wave.shape).astype(np.float32)
                relative = f"{word}/{speaker}_nohash_{i}.wav"
                soundfile.write(root / relative, np.clip(wave, -1, 1), 16000, subtype="PCM_16")
                if s >= len(voices) - held_out:
                    test.append(relative)
                elif s >= len(voices) - 2 * held_out:
                    val.append(relative)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    noise = root / "_background_noise_"
    noise.mkdir(exist_ok=True)
    soundfile.write(noise / "white_noise.wav", rng.normal(0, 0.1, 16000 * 5), 16000)
    return root


def _to_16k(wave: np.ndarray, rate: int) -> np.ndarray:
    import torch
    import torchaudio

    if rate == 16000:
        return wave
    return torchaudio.functional.resample(torch.from_numpy(wave), rate, 16000).numpy()


__all__ = ["DEMO_VOICES", "ESpeak", "SpeechError", "fit_to_second", "write_keyword_folder"]
