"""diffsparse: learned token sparsity for diffusion transformers, deployed as per-step graphs."""

__version__ = "0.1.0"
