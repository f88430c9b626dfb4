"""Take a trained model anywhere: safetensors folders, a diffusers pipeline, a model card."""
