"""The pretrained MNIST CNN shipped by the ``digit-recognizer-py`` package, loaded without importing it.

``digit_recognizer/__init__.py`` imports torchvision (for its PIL transforms), which we do not need
or require, so the weights file is located by path and the architecture is rebuilt here. The file
``digit_recognizer/models/handwriting_model.pth`` is a plain state dict (``OrderedDict`` of tensors,
loadable with ``weights_only=True``) whose keys match :class:`DigitRecognizerCNN`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DigitRecognizerCNN",
    "digit_recognizer_weights_path",
    "load_pretrained_digit_recognizer",
    "preprocess_for_digit_recognizer",
    "MNIST_MEAN",
    "MNIST_STD",
]

# The package's own preprocessing (digit_recognizer/recognizer.py): Resize((28, 28)), ToTensor()
# (uint8 -> [0, 1]), Normalize((0.1307,), (0.3081,)), white strokes on a black background.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_INSTALL_HINT = (
    "The pretrained digit recognizer needs the package digit-recognizer-py. Install it with "
    "`pip install --no-deps digit-recognizer-py` (--no-deps: its declared dependencies pull "
    "torchvision, which is not needed here)."
)
_WEIGHTS = ("models", "handwriting_model.pth")


class DigitRecognizerCNN(nn.Module):
    """Architecture of ``digit_recognizer.model.CNN`` (same parameter names), for ``[B, 1, 28, 28]``.

    ``conv_layers``: [Conv2d(1->32, 3, pad 1)-ReLU-MaxPool2], [Conv2d(32->64)-ReLU-MaxPool2],
    [Conv2d(64->128)-ReLU-MaxPool2]: 28 -> 14 -> 7 -> 3 (floor), so 128*3*3 = 1152 features.
    ``fc_layers``: Linear(1152->256)-ReLU-Linear(256->10). Output: ``[B, 10]`` logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 1, 28, 28]`` normalized images -> ``[B, 10]`` logits."""
        return self.fc_layers(self.conv_layers(x).flatten(1))


def digit_recognizer_weights_path() -> Path:
    """Path of ``handwriting_model.pth`` inside the installed package (the package is not imported).

    Raises:
        ImportError: digit-recognizer-py is not installed or its weights file is missing.
    """
    # find_spec of a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("digit_recognizer")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p).joinpath(*_WEIGHTS) for p in spec.submodule_search_locations]
    try:
        for f in importlib.metadata.files("digit-recognizer-py") or ():
            if f.name == _WEIGHTS[-1]:
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise ImportError(_INSTALL_HINT)


def load_pretrained_digit_recognizer(map_location: str | torch.device = "cpu") -> nn.Module:
    """Load the pretrained MNIST CNN of digit-recognizer-py as a :class:`DigitRecognizerCNN` in eval mode.

    Expected input: float ``[B, 1, 28, 28]`` MNIST-style digits (white strokes on a black
    background) scaled to ``[0, 1]`` and then normalized with ``(x - 0.1307) / 0.3081``, which is what
    :func:`preprocess_for_digit_recognizer` does to :class:`~examples.tasks.MNISTDataModule`
    images. Output: ``[B, 10]`` logits for the digits 0..9.

    The weights are loaded with ``load_state_dict(strict=True)``; parameters keep ``requires_grad=True``
    so the model can be fine-tuned (or factorized).

    Raises:
        ImportError: digit-recognizer-py is not installed (``pip install --no-deps digit-recognizer-py``).
    """
    state = torch.load(digit_recognizer_weights_path(), map_location=map_location, weights_only=True)
    model = DigitRecognizerCNN()
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess_for_digit_recognizer(x: Tensor) -> Tensor:
    """Convert :class:`MNISTDataModule` images to the pretrained net's input.

    Args:
        x: float ``[B, 1, H, W]`` (or ``[B, H, W]``) in ``[0, 1]``, white digit on black.
    Returns:
        float ``[B, 1, 28, 28]``: bilinearly resized to 28x28 if needed (as the package's
        ``Resize((28, 28))`` does; note the 8x8 sklearn digits are framed differently from MNIST so
        the pretrained net does poorly on them), then ``(x - 0.1307) / 0.3081``.
    """
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.float()
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return (x - MNIST_MEAN) / MNIST_STD
