"""Real-data building blocks shared by the examples, tests and benchmarks (no downloads)."""

from .mnist import FASHION_MNIST_DIR, SOURCES, MNISTClassifier, MNISTDataModule
from .pretrained import (
    DigitRecognizerCNN,
    digit_recognizer_weights_path,
    load_pretrained_digit_recognizer,
    preprocess_for_digit_recognizer,
)

__all__ = [
    "FASHION_MNIST_DIR",
    "SOURCES",
    "MNISTClassifier",
    "MNISTDataModule",
    "DigitRecognizerCNN",
    "digit_recognizer_weights_path",
    "load_pretrained_digit_recognizer",
    "preprocess_for_digit_recognizer",
]
