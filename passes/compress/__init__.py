"""Structured compression: passes that make a model smaller (and, where the structure allows,
faster) at a measured cost in accuracy. ``infoptc.passes`` imports every module here.

    channel_groups.py   which channels must be removed together (the dependency analysis)
    prune_channels.py   prune-channels: remove channels group by group
    refit.py            least-squares reconstruction of the next layers on calibration data
    low_rank.py         low-rank: truncated SVD of Gemm/MatMul weights
    cluster_weights.py  cluster-weights: a k-means codebook per weight tensor
    sparsify.py         sparsify: magnitude and 2:4 sparsity
    weights.py          which constants are weights (shared by the two above)
"""
