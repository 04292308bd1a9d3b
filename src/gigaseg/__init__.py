"""gigaseg: end-to-end deep learning on gigapixel pathology images."""

__version__ = "0.1.0"
