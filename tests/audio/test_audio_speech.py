"""The demo's eSpeak NG keyword folder: Speech Commands layout, held-out voices in the list
files, one-second 16 kHz clips holding speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from audio.speech import SpeechError, write_keyword_folder

VOICES = ("en", "en-us", "en+f4", "en+m3", "en-029")


def test_held_out_voices_make_validation_and_test(tmp_path):
    root = write_keyword_folder(
        tmp_path / "sc", ("yes", "no"), voices=VOICES, rates=(170,), pitches=(50,), held_out=2
    )
    speaker = {v: f"{i:08x}" for i, v in enumerate(VOICES)}
    val = (root / "validation_list.txt").read_text().split()
    test = (root / "testing_list.txt").read_text().split()
    assert {p.split("/")[1].split("_")[0] for p in test} == {speaker["en+m3"], speaker["en-029"]}
    assert {p.split("/")[1].split("_")[0] for p in val} == {speaker["en-us"], speaker["en+f4"]}
    assert len(val) == len(test) == 2 * 2  # words x voices
    clips = sorted(root.glob("*/*_nohash_*.wav"))
    assert len(clips) == 2 * 5
    wave, rate = soundfile.read(clips[0])
    assert rate == 16000 and wave.shape == (16000,)
    assert np.abs(wave).max() > 0.1  # a spoken word, well above the -30 dB noise floor


def test_held_out_must_leave_training_voices(tmp_path):
    with pytest.raises(SpeechError, match="no training voice"):
        write_keyword_folder(tmp_path / "sc", ("yes",), voices=VOICES[:4], held_out=2)


def test_demo_voice_variants_have_no_random_breath_noise():
    # eSpeak NG adds random noise for a variant's "breath" setting, so such variants differ
    # from run to run; the demo's variants must not have one (f2 does: the check can fail).
    import espeakng_loader

    from audio.speech import DEMO_VARIANTS

    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"

    def breathy(variant: str) -> bool:
        lines = (folder / variant).read_text(errors="replace").splitlines()
        return any(line.split()[:1] == ["breath"] for line in lines)

    assert breathy("f2") and not any(breathy(v) for v in DEMO_VARIANTS)
