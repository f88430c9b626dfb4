"""The figures the Emu paper (Dai et al., 2023, arXiv:2309.15807) and the works it builds on report, in one place:
every report that prints a number beside the paper's takes it from here.
"""

from __future__ import annotations

# quality-tuned vs pre-trained, human majority votes on PartiPrompts (the rest are ties)
APPEAL_WIN, APPEAL_LOSS = 0.829, 0.154
FAITHFULNESS_WIN, FAITHFULNESS_LOSS = 0.367, 0.210
EMU_VS_SDXL_APPEAL_WIN = 0.684

# 4 -> 16 latent channels at f=8 (SD3's autoencoder ablation): PSNR and rFID
PSNR_4CH_DB, PSNR_16CH_DB = 25.12, 28.62
RFID_4CH, RFID_16CH = 2.41, 1.06

CURATION_FUNNEL = ("Emu: billions -> a few hundred million (automatic) -> ~200K (size, balance) -> ~20K (generalists) "
                   "-> ~2000 (specialists): about 10x per human pass.")  # fmt: skip


def headline() -> str:
    """The paper's quality-tuning result in one sentence."""
    return (f"Paper (Emu vs its pre-trained model, human raters, PartiPrompts): visual appeal {APPEAL_WIN:.1%} win / "
            f"{APPEAL_LOSS:.1%} loss; text faithfulness {FAITHFULNESS_WIN:.1%} / {FAITHFULNESS_LOSS:.1%}.")  # fmt: skip
