"""Re-export: the token transformer lives in :mod:`difftools.models.token_transformer` (a model,
registered for rebuilding from checkpoints like the DiT, so ``difftools.load`` needs no recipe import)."""

from difftools.models.token_transformer import TokenTransformer

__all__ = ["TokenTransformer"]
