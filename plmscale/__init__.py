"""plmscale: pre-train language models at scale and shrink them for deployment."""

__version__ = "0.1.0"
