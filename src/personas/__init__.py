"""personas: many voices from one local model."""

__version__ = "0.1.0"
