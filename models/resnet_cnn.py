"""A small random-weight ResNet-style CNN (stem + 2 residual blocks with BatchNorm, 16/32 channels, 10 classes).

Shows the contract for a model that is not a language model: `example_inputs()` for tracing, `calibration()`
returning (images, labels) batches and `loss(model, batch)` (summed cross-entropy) for the curvature, and
`evaluation()` batches that the report scores with the same loss.  Data are random 16×16 images.
Try: `surgeon-compile models/resnet_cnn.py --target 0.6`.
"""
import torch

from surgeon_fx import zoo

CLASSES, SIZE = 10, 16


def build():
    torch.manual_seed(0)
    return zoo.ResNetCNN(channels=16, hidden=32, blocks=2, classes=CLASSES).eval()


def example_inputs():
    return (torch.randn(2, 3, SIZE, SIZE),)


def calibration(n, length, seed):  # length: not used by image models
    return zoo.image_batches(n, batch=8, classes=CLASSES, size=SIZE, seed=seed)


def loss(model, batch):
    return zoo.classification_loss(model, batch)


def evaluation():
    return zoo.image_batches(64, batch=16, classes=CLASSES, size=SIZE, seed=12345)
