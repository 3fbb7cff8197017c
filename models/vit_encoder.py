"""A small random-weight vision transformer encoder (16×16 images, 4×4 patches, width 32, 4 heads, 2 blocks).

Like `resnet_cnn.py` it brings its own `loss` and (images, labels) batches of random data; structured pruning
removes attention heads (Q/K/V rows with the O columns) and MLP neurons (FC1 rows with the FC2 columns).
Try: `surgeon-compile models/vit_encoder.py --target 0.7`.
"""
import torch

from surgeon_fx import zoo

CLASSES, SIZE = 10, 16


def build():
    torch.manual_seed(0)
    return zoo.ViTEncoder(image=SIZE, patch=4, width=32, heads=4, depth=2, mlp=64, classes=CLASSES).eval()


example_inputs, calibration, loss, evaluation = zoo.image_contract(SIZE, CLASSES)
