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


example_inputs, calibration, loss, evaluation = zoo.image_contract(SIZE, CLASSES)
