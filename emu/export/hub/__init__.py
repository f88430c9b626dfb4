"""Code shipped inside exported diffusers folders: it imports only torch, diffusers and transformers."""
