"""The version of unpatch, in one place below everything that records it (manifests, cards, --version)."""

__version__ = "0.1.0"
