"""Overlaid-text detection with a real OCR engine: Tesseract through ``pytesseract`` (offline).

Debian/Ubuntu: ``apt-get install tesseract-ocr``. Small images are upscaled before OCR, and both polarities
are read (light text on dark and dark on light). The score of an image is the number of letters in words
Tesseract reads with at least ``min_confidence``.
"""

from __future__ import annotations

import shutil

from PIL import Image, ImageOps

from emu.errors import ConfigError


def tesseract_available() -> bool:
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return False
    return shutil.which("tesseract") is not None


class TesseractText:
    """Letters of overlaid text per image."""

    name = "tesseract"

    def __init__(self, upscale_to: int = 256, min_confidence: float = 50.0, psm: int = 6):
        if not tesseract_available():
            raise ConfigError("ocr", "Tesseract is not installed (apt-get install tesseract-ocr; pip install "
                              "pytesseract), or set the text stage's engine to 'off'")  # fmt: skip
        import pytesseract

        self._tess = pytesseract
        self.upscale_to, self.min_confidence, self.psm = upscale_to, min_confidence, psm

    def letters(self, image: Image.Image) -> int:
        gray = ImageOps.grayscale(image)
        if min(gray.size) < self.upscale_to:
            scale = self.upscale_to / min(gray.size)
            gray = gray.resize((round(gray.width * scale), round(gray.height * scale)), Image.Resampling.LANCZOS)
        best = 0
        for img in (gray, ImageOps.invert(gray)):
            data = self._tess.image_to_data(img, config=f"--psm {self.psm}", output_type=self._tess.Output.DICT)
            n = sum(sum(c.isalpha() for c in word) for word, conf in zip(data["text"], data["conf"], strict=True)
                    if float(conf) >= self.min_confidence)  # fmt: skip
            best = max(best, n)
        return best
