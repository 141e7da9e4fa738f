"""Memory planning before renting GPUs (``dreambooth plan``).

``architectures``: a model's component configs (shipped for SD 1.5, SD 2.1 and SDXL base) and
modules built from them without weights; ``activations``: one micro-batch's activation peak,
measured on fake tensors (or real CPU tensors, to check); ``memory``: per-rank bytes of each ZeRO
stage / offload / checkpointing choice; ``report``: the plan, its table and the cheapest flags.
"""
