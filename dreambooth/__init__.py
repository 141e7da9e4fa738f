"""DreamBooth personalization of Stable Diffusion models at scale on Ray.

Stages, one module each: ``config`` → ``models`` / ``identifier`` / ``subjects`` → ``priors``
(Ray Data) → ``training`` (Ray Train + DeepSpeed) → ``export`` → ``sample``; ``pipeline`` chains
them for ``dreambooth run``; ``cli`` is the command line.
"""

__version__ = "0.1.0"
