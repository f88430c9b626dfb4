"""Stage 1 and 2: the text-conditioned latent U-Net, diffusion pieces (preconditioning, noise, loss weighting),
k-diffusion-style samplers and the LightningModule."""
