"""Networks: DiT (dit.py), EDM preconditioning (precond.py), frozen autoencoders (autoencoders/,
re-exported by vae.py) and the metric / guidance classifier (classifier.py)."""
