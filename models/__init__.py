from .binary import ApproxSign, BinaryConv2d, BinaryWeight, LearnableBias, SignConv2d, rprelu
from .reactnet import BasicBlock, ReActNetA, reactnet_a

__all__ = ["reactnet_a", "ReActNetA", "BasicBlock", "BinaryConv2d", "LearnableBias",
           "ApproxSign", "BinaryWeight", "SignConv2d", "rprelu"]
