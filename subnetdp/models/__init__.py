"""Plain PyTorch models. They know nothing of parallelism: SDP is applied to them from outside."""

from .resnet import BasicBlock, ResNet, resnet18

__all__ = ["BasicBlock", "ResNet", "resnet18"]
