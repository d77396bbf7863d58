"""The deployable 1-bit network and the operation counter. Its commands are utils/export.py
(`python -m utils.export`) and utils/ops.py (`python -m utils.ops`).

packed.py        the packed 1-bit ReActNet-A: to_packed, export, load_packed, verify
kernel.py        its CPU kernel (binary_conv.cpp, built at first use)
block.py         a packed block, its float parts fused into the kernel's calls
latency.py       float against packed timings (`python -m utils.export --benchmark`)
opcount.py       BOPs, FLOPs and OPs as the papers count them, and the layer-by-layer summary

It needs only the models, the checkpoint format and the data (utils/checkpoint.py, utils/data.py):
nothing of the training run.
"""
