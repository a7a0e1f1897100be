"""Networks: DiT (dit.py), autoencoders (vae.py), classifiers."""
