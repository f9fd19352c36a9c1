"""ronan_fast: was this image made by this model? Fast alteration-free origin attribution."""

__version__ = "0.1.0"
