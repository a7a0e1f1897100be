"""Float8 training of a transformer's token GEMMs (torchao's ``float8`` training; opt-in).

Which matmuls: in every block with the DiT / timm layout, the four Linears that multiply the token
matrix, ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` (:data:`TOKEN_GEMMS`). Their M is
batch x tokens (e.g. 128 x 256 = 32,768 rows for DiT-XL/2 on 32x32 latents) and together they are
96 % of a DiT-L/2 or DiT-XL/2 forward's FLOPs at 256 tokens (:meth:`DiT.flops_per_image`'s
accounting). Left as they are: the adaLN modulation and the timestep MLP (their M is the batch, a
few hundred rows, where casting to fp8 costs more than the faster matmul saves), the label and patch
embeddings (a table and a convolution) and the final projection (N = p * p * C_out <= 32 columns).

What a converted Linear computes (torchao ``Float8Linear``; the FP8 formats of Micikevicius et al.,
"FP8 Formats for Deep Learning", arXiv 2209.05433). With dynamic scaling, each step and each operand
gets a scale from its current absolute maximum, s = fp8_max / amax (e4m3: fp8_max = 448; e5m2:
57344), so that the largest value lands at the top of the fp8 range::

    forward      y  = (e4m3(s_x x) @ e4m3(s_w W)^T) / (s_x s_w) + b
    backward     dx = (g8(s_g g) @ e4m3(s_w W)) / (s_g s_w)
                 dW = (g8(s_g g)^T @ e4m3(s_x x)) / (s_g s_x)

Each product is ``torch._scaled_mm`` (fp8 operands, fp32 accumulation, output in the autocast dtype;
torchao runs the forward product with the GPU's fast fp8 accumulation, the two backward ones
without). ``recipe="tensorwise"``: one scale per tensor; gradients g in e5m2 (g8 = e5m2: more range,
fewer mantissa bits); the fastest (cuBLAS) kernels. ``recipe="rowwise"``: one scale per slice along
the contracted dimension (y: per token of x, per output channel of W; dx: per token of g, per input
channel of W; dW: per channel of g and of x, taken over the tokens), gradients in e4m3 too
(g8 = e4m3), every scale rounded down to a power of two, products returned in bf16 (also outside
autocast); more robust to outlier rows, slower (CUTLASS) kernels. ``tests/test_fp8.py`` checks these
equations against a converted Linear.

Master weights, their gradients and the optimizer state stay in the parameters' own dtype (fp32);
only the matmul operands are cast, each step, from the current values. A converted Linear is an
``nn.Linear`` subclass with the same parameters, so the state dict is unchanged and a checkpoint of
an fp8 run is a plain checkpoint (``difftools.load`` rebuilds an ordinary model from it).

Hardware: fp8 tensor cores need CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell), which
the trainer checks with :func:`require_float8_device` (torch's CPU ``_scaled_mm`` runs the same code,
slowly: the tests use it). ``torch._scaled_mm`` needs both dimensions
of the weight to be multiples of 16, which :func:`float8_token_gemms` checks (every DiT preset
meets it). Needs ``torchao`` (``pip install 'difftools[fp8]'``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MIN_CAPABILITY", "RECIPES", "TOKEN_GEMMS", "Float8Unavailable", "float8_token_gemms",
           "require_float8_device", "require_torchao", "token_gemm_names"]

#: scaling recipes of :func:`float8_token_gemms` (torchao's ``Float8LinearRecipeName`` values)
RECIPES = ("tensorwise", "rowwise")
#: the Linears of a transformer block that multiply the token matrix, relative to the block
TOKEN_GEMMS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
#: fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.0, 12.0)
MIN_CAPABILITY = (8, 9)
#: ``torch._scaled_mm`` needs K and N of every product to be multiples of this
_ALIGN = 16
_INSTALL = "pip install 'difftools[fp8]' (torchao>=0.17)"


class Float8Unavailable(RuntimeError):
    """Float8 training cannot run here: torchao is missing or the GPU has no fp8 tensor cores."""


def require_torchao():
    """``torchao.float8``, or :class:`Float8Unavailable` saying which extra installs it."""
    try:
        import torchao.float8 as float8
    except ImportError as err:
        raise Float8Unavailable(f"float8 training needs torchao, which is not importable here ({err}); "
                                f"install it with: {_INSTALL}") from None
    return float8


def _check_recipe(recipe) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown float8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return recipe


def require_float8_device(device: torch.device | str, setting: str = "float8 training") -> None:
    """Raise :class:`Float8Unavailable` unless ``device`` is a CUDA GPU with fp8 tensor cores
    (compute capability >= 8.9). ``setting`` names the option in the message (e.g.
    ``"trainer.fp8='tensorwise'"``)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise Float8Unavailable(
            f"{setting} needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
            f"Blackwell); this run is on {device.type}. Turn it off (null) to train in bf16/fp32.")
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if tuple(capability) < MIN_CAPABILITY:
        raise Float8Unavailable(
            f"{setting} needs a GPU with float8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
            f"Blackwell); cuda:{index} is {torch.cuda.get_device_name(index)} with compute capability "
            f"{capability[0]}.{capability[1]}. Turn it off (null) to train in bf16.")


def token_gemm_names(model: nn.Module) -> list[str]:
    """Qualified names of the token-GEMM Linears (:data:`TOKEN_GEMMS`) of every block of ``model``,
    in module order. A block is any submodule that has all four as ``nn.Linear`` (a DiT's
    ``DiTBlock``; a wrapper around the DiT, e.g. EDM preconditioning, is looked through)."""
    names = []
    for block_name, block in model.named_modules():
        linears = [block.get_submodule(rel) if _has(block, rel) else None for rel in TOKEN_GEMMS]
        if all(isinstance(m, nn.Linear) for m in linears):
            prefix = f"{block_name}." if block_name else ""
            names += [prefix + rel for rel in TOKEN_GEMMS]
    return names


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def float8_token_gemms(model: nn.Module, recipe: str = "tensorwise") -> list[str]:
    """Convert the token GEMMs of every transformer block of ``model`` (in place) to torchao's float8
    training Linear with ``recipe`` (``"tensorwise"`` | ``"rowwise"``; see the module docstring for
    what each computes); every other Linear stays as it is. Call it before ``torch.compile``; an
    optimizer built earlier keeps working (the converted modules hold the same parameter objects).
    Returns the converted modules' names.

    Errors, all raised before anything is converted: an unknown recipe (ValueError naming the
    choices), no block with :data:`TOKEN_GEMMS` in ``model`` or one of them not a plain ``nn.Linear``
    (e.g. converted before; ValueError), a Linear whose in or out features are not multiples of 16
    (ValueError naming it and its shape), torchao missing (:class:`Float8Unavailable` naming the
    extra that installs it). Whether the GPU has fp8 tensor cores is :func:`require_float8_device`'s
    check, made where the device is known."""
    _check_recipe(recipe)
    names = token_gemm_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no transformer block with {', '.join(TOKEN_GEMMS)} "
                         "Linears (a DiT's blocks): nothing to train in float8")
    float8 = require_torchao()
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:  # e.g. torchao's Float8Linear: converted before
            raise ValueError(f"{name} is a {type(linear).__name__}, not a plain nn.Linear: was the model "
                             "converted to float8 before?")
        bad = [n for n in (linear.in_features, linear.out_features) if n % _ALIGN]
        if bad:
            raise ValueError(
                f"{name} is Linear({linear.in_features} -> {linear.out_features}): float8 matmuls "
                f"(torch._scaled_mm) need in and out features that are multiples of {_ALIGN}; choose a "
                f"hidden_size (and mlp_ratio) that give them, as every DiT preset does, or train without fp8")
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    chosen = set(names)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: fqn in chosen)
    return names
