"""ckptscope: a web-based model weight inspector."""

__version__ = "0.1.0"
