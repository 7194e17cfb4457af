"""unpatch: build, share and apply unlearning patches for causal language models."""

__version__ = "0.1.0"
