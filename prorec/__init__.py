"""PRORec: progressive collaborative and semantic knowledge fusion for generative recommendation."""
__version__ = "0.1.0"
