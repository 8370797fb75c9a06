"""GroupViT and PGSeg ported to plain PyTorch as ovseg predictors (`groupvit`, `pgseg`).

Modules: `layers`/`grouping`/`vision`/`text`/`model` (the network), `checkpoint` (reading release
files safely, key conversion), `decode` (the release's segmentation decoding as tensor functions),
`predictor` (the `VLMPredictor`s). Importing this package imports nothing heavy.

The architectures and decoding follow NVIDIA-licensed research code (NVIDIA Source Code License,
non-commercial use); see docs/pgseg.md.
"""
