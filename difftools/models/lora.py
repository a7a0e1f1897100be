"""LoRA adapters on a DiT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685), through peft as diffusers does: an optional dependency (``pip install
'difftools[lora]'``), imported only when an adapter is built.

Each targeted linear layer W becomes W x + (alpha / r) B A x with A [r, in] and B [out, r]; only A
and B train. peft's ``gaussian`` init (A ~ N(0, 1/r), B = 0; the released DiffusionNFT code's
choice) makes the adapted model start exactly at the base. :meth:`LoRADiT.merged` folds the
adapters into a plain :class:`~difftools.models.dit.DiT` (W <- W + (alpha / r) B A), and
:meth:`LoRADiT.adapters_disabled` evaluates the base model without a second copy of it (the
released code's reference for its KL term).

A checkpoint of a :class:`LoRADiT` stores the base weights and the adapters, and ``difftools.load``
rebuilds it (peft must be installed to load it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from difftools.models.dit import DiT
from difftools.models.registry import register_rebuildable

#: the DiT's attention projections (the released code adapts SD3's q, k, v and output projections)
DEFAULT_TARGETS = ("attn.qkv", "attn.proj")


def _peft():
    try:
        import peft
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as err:
        raise ImportError(
            "LoRA adapters need peft: pip install 'difftools[lora]' (or pip install peft)"
        ) from err
    return peft, BaseTunerLayer


@register_rebuildable
class LoRADiT(nn.Module):
    """A DiT whose ``targets`` linear layers carry LoRA adapters; only the adapters train.

    Args:
        base: the DiT to adapt (its weights are kept and frozen), or its ``config()`` mapping.
        rank: r (released code: 32).
        alpha: the adapter output is scaled by alpha / r (released code: 64).
        targets: module-name suffixes of the linear layers to adapt.
        dropout: dropout on the adapter input (0 in the released code).
    """

    def __init__(
        self,
        base: DiT | Mapping,
        rank: int = 32,
        alpha: float = 64.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        dropout: float = 0.0,
    ):
        super().__init__()
        peft, _ = _peft()
        net = base if isinstance(base, nn.Module) else DiT(**base)
        if not isinstance(net, DiT):
            raise TypeError(f"LoRADiT adapts a difftools DiT, got {type(net).__name__}")
        if int(rank) < 1 or alpha <= 0:
            raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        names = [
            n
            for n, m in net.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
        ]
        if not names:
            raise ValueError(
                f"lora.targets {list(targets)} match no linear layer of the DiT (its attention "
                f"layers are named like blocks.0.attn.qkv / blocks.0.attn.proj)"
            )
        self._base_config = net.config()
        self.rank, self.alpha, self.targets, self.dropout = (
            int(rank),
            float(alpha),
            tuple(targets),
            float(dropout),
        )
        config = peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
            target_modules=list(self.targets),
        )
        net.requires_grad_(False)
        self.net = peft.inject_adapter_in_model(config, net)  # adapters are created trainable
        for name, p in self.net.named_parameters():
            p.requires_grad_(".lora_" in name)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def config(self) -> dict:
        return {
            "base": dict(self._base_config),
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "dropout": self.dropout,
        }

    def __getattr__(self, name: str):
        # the DiT's attributes (in_channels, input_size, num_classes, null_class, flops_per_image, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "net":
                raise
            return getattr(super().__getattr__("net"), name)

    def adapter_layers(self) -> list[nn.Module]:
        _, tuner_layer = _peft()
        return [m for m in self.net.modules() if isinstance(m, tuner_layer)]

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the base model: every adapter off inside the block (no copy of the weights)."""
        layers = self.adapter_layers()
        for m in layers:
            m.enable_adapters(False)
        try:
            yield self
        finally:
            for m in layers:
                m.enable_adapters(True)

    @torch.no_grad()
    def merged(self) -> DiT:
        """A plain DiT with every adapter folded in: W <- W + (alpha / r) B A (peft's
        ``get_delta_weight``), biases and all other weights unchanged."""
        layers = {name: m for name, m in self.net.named_modules() if m in set(self.adapter_layers())}
        state = {}
        for key, value in self.net.state_dict().items():
            if ".lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value.clone()
        for name, layer in layers.items():
            state[f"{name}.weight"] += layer.get_delta_weight("default").to(state[f"{name}.weight"].dtype)
        param = next(self.net.parameters())
        out = DiT(**self._base_config).to(device=param.device, dtype=param.dtype)
        out.load_state_dict(state, strict=True)
        return out.eval()
