"""People in the loop: a small web app for the human curation passes and for pairwise A/B evaluation
(``python -m emu.annotate``)."""
