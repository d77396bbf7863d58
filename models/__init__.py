"""ReActNet-A as AdamBNN trains it: `reactnet_a(binary_weights=False)` is the step-1 network,
`reactnet_a(binary_weights=True)` the step-2 one (models/reactnet.py); the binarizers are in
models/binary.py."""
from .binary import BinaryConv2d, BinaryWeight, LearnableBias, SignConv2d
from .reactnet import BasicBlock, ReActNetA, reactnet_a

__all__ = ["reactnet_a", "ReActNetA", "BasicBlock", "BinaryConv2d", "LearnableBias", "BinaryWeight", "SignConv2d"]
