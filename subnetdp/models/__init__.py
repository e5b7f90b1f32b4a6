"""Plain PyTorch models. They know nothing of parallelism: SDP is applied to them from outside."""

from .llama import DecoderBlock, Llama, LlamaConfig, llama, num_parameters
from .resnet import BasicBlock, ProjectionBlock, ResNet, resnet18
from .vit import ViT, vit

__all__ = ["BasicBlock", "DecoderBlock", "Llama", "LlamaConfig", "ProjectionBlock", "ResNet", "ViT", "llama",
           "num_parameters", "resnet18", "vit"]
