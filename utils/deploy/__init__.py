"""The deployable 1-bit network and the operation counter.

export.py  the packed 1-bit ReActNet-A: export, load_packed, verify, latency benchmark
           (`python -m utils.export`, kept at that name)
ops.py     BOPs, FLOPs and OPs as the papers count them, and the layer-by-layer summary
           (`python -m utils.ops`, kept at that name)
"""
