"""emu: a reproduction of Meta's Emu recipe (pre-training, curation, quality-tuning) with a CPU miniature."""

__version__ = "0.1.0"
