"""Benchmarks of ReActNet-A's training, and the original release's code path they compare with.

    python -m utils.bench iteration    time and peak memory of one training iteration, step 1 and
                                       step 2: the original code path (baseline.py) against this
                                       repository's modes (fp32, bf16, channels_last, compile)
    python -m utils.bench loader       images/s per loader worker of the train transform, stage by
                                       stage, on generated JPEGs
    python -m utils.bench precision    gradient cosine of fp32, tf32 (CUDA) and bf16 to a float64
                                       reference, at initialization
    python -m utils.bench end-to-end   images/s of the training loop fed by each data backend (pil,
                                       torch), beside the model alone

Each prints a table and writes its results as JSON with `--json PATH`; `--help` after a
subcommand lists its flags. Modules: one per subcommand (iteration, loader, precision_check,
end_to_end); common: the models and batch, waiting for the device, the machine's description,
generated JPEGs; baseline: the original's network and training step; __main__: the command
line. The training code uses none of them.
"""
