"""Audio data modules on generated folders: split membership, labels, folds, errors,
resampling, and features equal to transformers' ASTFeatureExtractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from audio_toy import make_esc50, make_speech_commands, tone

from audio.data import AudioDataModule, DatasetError, esc50_folds, load_waveform
from audio.features import ast_features, normalize

pytestmark = pytest.mark.usefixtures("single_thread")


def test_esc50_folds_both_protocols():
    assert esc50_folds(1, "loo") == {"train": (2, 3, 4, 5), "val": (1,), "test": (1,)}
    assert esc50_folds(5, "rotate") == {"train": (2, 3, 4), "val": (1,), "test": (5,)}
    assert esc50_folds(2, "rotate") == {"train": (1, 4, 5), "val": (3,), "test": (2,)}
    with pytest.raises(DatasetError, match="1..5"):
        esc50_folds(0, "loo")


def test_esc50_split_membership_and_labels(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    dm = AudioDataModule(root, dataset="esc50", fold=3, protocol="rotate", num_workers=0)
    splits = dm.splits()
    folds = {s: {int(x.path.name.split("-")[0]) for x in v} for s, v in splits.items()}
    assert folds == {"train": {1, 2, 5}, "val": {4}, "test": {3}}
    assert dm.num_classes == 3 and dm.max_length == 500
    for sample in splits["train"]:
        assert sample.label == int(sample.path.stem.split("-")[-1]) // 10
    esc10 = AudioDataModule(root, dataset="esc50", esc10=True, num_workers=0)
    assert esc10.num_classes == 2
    assert {s.label for s in esc10.splits()["test"]} == {0, 1}


def test_esc50_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"meta/esc50.csv does not exist"):
        AudioDataModule(tmp_path, dataset="esc50").splits()
    root = make_esc50(tmp_path / "ESC-50")
    missing = next((root / "audio").glob("2-*.wav"))
    missing.unlink()
    dm = AudioDataModule(root, dataset="esc50", fold=1, num_workers=0)
    dm.setup()
    index = [s.path for s in dm.datasets["train"].samples].index(missing)
    with pytest.raises(DatasetError, match=r"esc50.csv:\d+: audio file .* does not exist"):
        dm.datasets["train"][index]


def test_resampling_44k(tmp_path):
    rate = 44100
    root = make_esc50(tmp_path / "ESC-50", rate=rate)
    sample = AudioDataModule(root, num_workers=0).splits()["test"][0]
    wave = load_waveform(sample)
    assert wave.shape == (8000,)  # 0.5 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 300) < 5  # the class-0 tone kept


def test_speech_commands_lists_decide(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    dm = AudioDataModule(root, dataset="speechcommands", task="35", num_workers=0)
    splits = dm.splits()
    names = {s: sorted(f"{x.path.parent.name}/{x.path.name}" for x in v) for s, v in splits.items()}
    assert names["val"] == sorted((root / "validation_list.txt").read_text().split())
    assert names["test"] == sorted((root / "testing_list.txt").read_text().split())
    assert len(names["train"]) == 6 and dm.class_names == ["cat", "no", "yes"]
    assert dm.max_length == 100
    twelve = AudioDataModule(root, dataset="speechcommands", task="12", num_workers=0)
    assert twelve.num_classes == 12
    labels = [twelve.class_names[s.label] for s in twelve.splits()["train"]]
    assert labels.count("_unknown_") == 2 and labels.count("_silence_") == 1
    assert "_background_noise_" not in dm.class_names
    twelve.setup()
    features, label, _ = twelve.datasets["train"][len(labels) - 1]
    assert features.shape == (100, 128) and twelve.class_names[label] == "_silence_"


def test_few_shot_k_per_class(tmp_path):
    root = make_esc50(tmp_path / "ESC-50")
    dm = AudioDataModule(root, few_shot=3, num_workers=0)
    train = dm.splits()["train"]
    assert sorted(s.label for s in train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(DatasetError, match="few-shot"):
        AudioDataModule(root, few_shot=100, num_workers=0).splits()


def test_features_match_ast_feature_extractor():
    from transformers import ASTFeatureExtractor

    wave = tone(2, 1.3, 16000, 0)
    for max_length in (100, 500):
        ours = ast_features(torch.from_numpy(wave), max_length)
        theirs = ASTFeatureExtractor(max_length=max_length)(
            wave, sampling_rate=16000, return_tensors="pt"
        )["input_values"][0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_specaugment_masks_bands(tmp_path):
    wave = torch.from_numpy(tone(1, 1.0, 16000, 0))
    g = torch.Generator().manual_seed(0)
    masked = ast_features(wave, 90, freq_mask=24, time_mask=80, generator=g)
    plain = ast_features(wave, 90)  # 98 frames cropped: no zero padding
    zero = (masked - plain).abs().sum() > 0
    assert zero
    floor = normalize(torch.zeros(1))[0]  # a masked cell: zero fbank, then normalised
    assert (masked == floor).any() and not (plain == floor).any()
