"""``make demo``: the whole Emu recipe in miniature through the real entry points, ending in ``REPORT.md``."""
