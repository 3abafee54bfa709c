"""regioncap: region-level captions for images with boxes, from a vision-language model."""

__version__ = "0.1.0"
