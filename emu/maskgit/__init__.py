"""A masked generative image transformer (MaskGIT, Chang et al. 2022; Muse, Chang et al. 2023) over FSQ tokens."""
