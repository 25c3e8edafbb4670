"""Tiny ESC-50 / Speech Commands folders and a tiny AST config for the audio tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

TINY_AST = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "patch_size": 16,
    "frequency_stride": 16,
    "time_stride": 16,
}


def tone(label: int, seconds: float, rate: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.5 * np.sin(2 * np.pi * (300 + 400 * label) * t) + 0.05 * rng.normal(size=t.size)
    return wave.astype(np.float32)


def make_esc50(root: Path, classes: int = 3, per_fold: int = 2, rate: int = 16000) -> Path:
    """ESC-50 layout: 5 folds x classes x per_fold clips of 0.5 s; targets 0, 10, 20..."""
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    lines = [",".join(("filename", "fold", "target", "category", "esc10", "src_file", "take"))]
    for fold in range(1, 6):
        for c in range(classes):
            target = 10 * c
            for clip in range(per_fold):
                name = f"{fold}-{100 * c + clip}-A-{target}.wav"
                soundfile.write(root / "audio" / name, tone(c, 0.5, rate, fold * 100 + clip), rate)
                esc10 = "True" if c != 1 else "False"
                lines.append(f"{name},{fold},{target},class{target},{esc10},{clip},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


def make_speech_commands(root: Path, words=("yes", "no", "cat"), per_word: int = 4) -> Path:
    """Speech Commands layout with the list files deciding validation and test."""
    val, test = [], []
    for w, word in enumerate(words):
        (root / word).mkdir(parents=True)
        for i in range(per_word):
            name = f"{i:08x}_nohash_0.wav"
            soundfile.write(root / word / name, tone(w, 1.0, 16000, i), 16000)
            (val if i == 0 else test if i == 1 else []).append(f"{word}/{name}")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "_background_noise_").mkdir()
    soundfile.write(root / "_background_noise_" / "noise.wav", tone(0, 3.0, 16000, 9) * 0, 16000)
    return root
