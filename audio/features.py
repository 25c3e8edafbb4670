"""AST input features: torchaudio's Kaldi-compatible log-mel filterbank, exactly as
transformers' ``ASTFeatureExtractor`` computes it (Gong et al., 2021, "AST: Audio
Spectrogram Transformer"): 16 kHz, 25 ms Hanning windows every 10 ms, 128 mel bins, padded
with zeros or cropped to ``max_length`` frames, AudioSet-normalised as (x - mean) / (2 std).
SpecAugment (Park et al., 2019) masks frequency and time bands before normalisation, as
the AST recipe does."""

from __future__ import annotations

import torch
import torchaudio

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974
# Frames per dataset as in Cappellazzo et al. (2024): 5 s ESC-50 clips, 1 s keywords.
MAX_LENGTH = {"esc50": 500, "speechcommands": 100}


def fbank(waveform: torch.Tensor, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """(frames, mel bins) log-mel filterbank of a mono 16 kHz waveform (1-D, floats)."""
    return torchaudio.compliance.kaldi.fbank(
        waveform.float().reshape(1, -1),
        sample_frequency=SAMPLE_RATE,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
    )


def pad_or_crop(features: torch.Tensor, max_length: int) -> torch.Tensor:
    """Zero-pad at the end or crop the tail to ``max_length`` frames."""
    frames = features.shape[0]
    if frames >= max_length:
        return features[:max_length]
    return torch.nn.functional.pad(features, (0, 0, 0, max_length - frames))


def spec_augment(
    features: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One frequency band of width < ``freq_mask`` and one time band of width < ``time_mask``
    set to zero (torchaudio's masking transforms draw the widths uniformly)."""
    out = features
    for width, dim in ((freq_mask, 1), (time_mask, 0)):
        if width > 0:
            size = out.shape[dim]
            w = int(torch.randint(0, min(width, size), (), generator=generator))
            start = int(torch.randint(0, size - w + 1, (), generator=generator))
            out = out.clone()
            out.narrow(dim, start, w).zero_()
    return out


def normalize(features: torch.Tensor, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD):
    """AST's normalisation: (x - mean) / (2 std)."""
    return (features - mean) / (2 * std)


def ast_features(
    waveform: torch.Tensor,
    max_length: int,
    *,
    freq_mask: int = 0,
    time_mask: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The (max_length, 128) AST input of a 16 kHz waveform; equals ``ASTFeatureExtractor``'s
    output when no masking is asked for."""
    features = pad_or_crop(fbank(waveform), max_length)
    if freq_mask or time_mask:
        features = spec_augment(features, freq_mask, time_mask, generator)
    return normalize(features)


def resample(waveform: torch.Tensor, rate: int) -> torch.Tensor:
    """``waveform`` at ``rate`` Hz resampled to 16 kHz (torchaudio's sinc interpolation)."""
    if rate == SAMPLE_RATE:
        return waveform
    return torchaudio.functional.resample(waveform, rate, SAMPLE_RATE)


__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "MAX_LENGTH",
    "NUM_MEL_BINS",
    "SAMPLE_RATE",
    "ast_features",
    "fbank",
    "normalize",
    "pad_or_crop",
    "resample",
    "spec_augment",
]
