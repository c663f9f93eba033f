"""Measure GGUF quants of Llama 3.2 1B with llama.cpp, and hold the VRAM / tok/s formulas of estimate pages
to account."""

__version__ = "0.1.0"
