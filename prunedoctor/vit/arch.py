"""The architecture of a timm Vision Transformer, read from its state dict.

A state dict gives every size of a ViT except the head count: depth, width,
per-block attention and MLP widths, patch size, input channels, image size,
prefix tokens and classifier size all follow from tensor shapes. The head
count comes from the user, a timm model name, the checkpoint's saved
arguments, the pattern of zeroed qkv rows of a head-pruned checkpoint, or,
failing all of those, a stated assumption.

Head ``h`` of block ``i`` owns qkv rows ``p * A_i + h * d .. p * A_i + h * d + d - 1``
for ``p`` in 0, 1, 2 (q, k, v) and proj columns ``h * d .. h * d + d - 1``,
where ``d`` is the head width and ``A_i = H_i * d`` the block's attention
width (``A_i`` equals the embedding width unless the checkpoint was
physically slimmed).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prunedoctor.errors import StructureError
from prunedoctor.reparam import ORIG_SUFFIX, ReparamIndex, effective_tensor, index_reparametrization

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunedoctor.reparam import ParameterStats

__all__ = [
    "VitArchitecture",
    "infer_architecture",
    "infer_paired_architectures",
    "build_timm_model",
    "load_weights_strictly",
    "block_layer_names",
]

_logger = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")

# Head counts of the timm ViT families by embedding width, from the timm 1.0
# model definitions. Most use heads of width 64, but the wider families
# (huge, giant, gigantic, SigLIP so400m) keep 16 heads of a wider width.
_USUAL_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1664: 16}
_USUAL_HEAD_DIM = 64

# Keys under which training scripts save the head count or the model name.
_ARGS_HEAD_KEYS = ("num_heads", "heads", "n_heads", "nheads", "n_head")
_ARGS_MODEL_KEYS = ("model", "model_name", "arch", "architecture")


@dataclass(frozen=True)
class VitArchitecture:
    """Sizes of a timm ``VisionTransformer``, as far as its state dict gives them.

    Attributes:
        depth: Number of transformer blocks.
        embed_dim: Embedding width ``D``.
        num_heads: Head count of an unslimmed block (``heads_per_block`` holds the actual counts).
        head_dim: Width ``d`` of one head.
        mlp_hidden: Hidden width ``F_i`` of each block's MLP.
        heads_per_block: Head count ``H_i`` of each block (smaller than
            ``num_heads`` in a physically slimmed block).
        patch_size: Side of a square patch, in pixels.
        in_chans: Input image channels.
        img_size: Side of the square input image, in pixels.
        num_prefix_tokens: Class, distillation and register tokens before the patch tokens.
        has_class_token: Whether the model has a class token.
        num_reg_tokens: Number of register tokens.
        num_classes: Classifier outputs (0 without a classifier).
        heads_source: Where ``num_heads`` came from, for the user.
        qkv_bias: Whether the qkv projections have a bias.
        proj_bias: Whether the attention output projections have a bias.
        mlp_bias: Whether the MLP layers have biases.
        qk_norm: Whether the blocks normalise queries and keys.
        layer_scale: Whether the blocks have layer-scale factors (``ls1``, ``ls2``).
        pre_norm: Whether a norm runs before the blocks (``norm_pre``).
        fc_norm: Whether the pooled features go through ``fc_norm``.
        no_embed_class: Whether the position embedding skips the prefix tokens.
        has_dist_token: Whether the model has a distillation token and head (DeiT).
        global_pool: timm pooling mode: ``token`` or ``avg``.
    """

    depth: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: tuple[int, ...]
    heads_per_block: tuple[int, ...]
    patch_size: int
    in_chans: int
    img_size: int
    num_prefix_tokens: int
    has_class_token: bool
    num_reg_tokens: int
    num_classes: int
    heads_source: str
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    qk_norm: bool = False
    layer_scale: bool = False
    pre_norm: bool = False
    fc_norm: bool = False
    no_embed_class: bool = False
    has_dist_token: bool = False
    global_pool: str = "token"

    @property
    def heads_assumed(self) -> bool:
        """Whether the head count is an assumption rather than given or inferred."""
        return self.heads_source.startswith("assumed")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image that the blocks process: patches plus prefix tokens."""
        return self.num_patches + self.num_prefix_tokens

    def attn_dim(self, block: int) -> int:
        """Attention width ``A_i = H_i * d`` of a block: its qkv rows divided by 3."""
        return self.heads_per_block[block] * self.head_dim

    @property
    def is_slimmed(self) -> bool:
        """Whether the blocks differ in head or neuron counts, or have fewer heads than ``num_heads``."""
        return len(set(self.heads_per_block)) > 1 or len(set(self.mlp_hidden)) > 1 or (
            self.depth > 0 and self.heads_per_block[0] != self.num_heads
        )


def block_layer_names(block: int) -> dict[str, str]:
    """Return the parameter names of one block's four prunable weight matrices."""
    prefix = f"blocks.{block}"
    return {
        "qkv": f"{prefix}.attn.qkv.weight",
        "proj": f"{prefix}.attn.proj.weight",
        "fc1": f"{prefix}.mlp.fc1.weight",
        "fc2": f"{prefix}.mlp.fc2.weight",
    }


def _shapes(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Return parameter name -> shape, naming ``X_orig`` as ``X`` (shapes need no merge)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in weights.items():
        name = key[: -len(ORIG_SUFFIX)] if key.endswith(ORIG_SUFFIX) else key
        shapes.setdefault(name, tuple(tensor.shape))
    return shapes


def _count_blocks(shapes: Mapping[str, tuple[int, ...]]) -> int:
    indices = {int(match.group(1)) for key in shapes if (match := _BLOCK_KEY.match(key))}
    if not indices:
        raise StructureError(
            "not a timm ViT state dict: no 'blocks.N.' keys; prunedoctor reads timm VisionTransformer "
            "names (blocks.0.attn.qkv.weight, ...)"
        )
    depth = max(indices) + 1
    missing = sorted(set(range(depth)) - indices)
    if missing:
        raise StructureError(f"blocks {missing} are missing although block {depth - 1} exists")
    return depth


def _check_required(shapes: Mapping[str, tuple[int, ...]], depth: int) -> None:
    required = ["patch_embed.proj.weight", "pos_embed"]
    for block in range(depth):
        required += block_layer_names(block).values()
    missing = sorted(name for name in required if name not in shapes)
    if missing:
        listed = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise StructureError(f"not a timm ViT state dict: missing {listed}")


def _read_block_widths(
    shapes: Mapping[str, tuple[int, ...]], depth: int, embed_dim: int
) -> tuple[list[int], list[int]]:
    """Return the attention width and MLP width of every block, checking the four matrices agree."""
    attn_dims: list[int] = []
    mlp_hidden: list[int] = []
    problems: list[str] = []
    for block in range(depth):
        names = block_layer_names(block)
        qkv, proj, fc1, fc2 = (shapes[names[k]] for k in ("qkv", "proj", "fc1", "fc2"))
        rows = qkv[0] if len(qkv) == 2 else -1
        attn_dim = rows // 3
        if len(qkv) != 2 or qkv[1] != embed_dim or rows % 3:
            problems.append(f"{names['qkv']} has shape {qkv}, expected (3 * A, {embed_dim})")
        if proj != (embed_dim, attn_dim):
            problems.append(f"{names['proj']} has shape {proj}, expected ({embed_dim}, {attn_dim})")
        hidden = fc1[0] if len(fc1) == 2 else -1
        if len(fc1) != 2 or fc1[1] != embed_dim:
            problems.append(f"{names['fc1']} has shape {fc1}, expected (F, {embed_dim})")
        if fc2 != (embed_dim, hidden):
            problems.append(f"{names['fc2']} has shape {fc2}, expected ({embed_dim}, {hidden})")
        attn_dims.append(attn_dim)
        mlp_hidden.append(hidden)
    if problems:
        raise StructureError("unexpected ViT block shapes: " + "; ".join(problems))
    return attn_dims, mlp_hidden


def _read_tokens(shapes: Mapping[str, tuple[int, ...]], embed_dim: int, patch_size: int) -> dict[str, Any]:
    """Return the prefix-token layout and the image size from ``pos_embed`` and the token tensors."""
    has_class_token = "cls_token" in shapes
    has_dist_token = "dist_token" in shapes
    num_reg_tokens = shapes["reg_token"][1] if "reg_token" in shapes else 0
    num_prefix = int(has_class_token) + int(has_dist_token) + num_reg_tokens
    pos_shape = shapes["pos_embed"]
    if len(pos_shape) != 3 or pos_shape[2] != embed_dim:
        raise StructureError(f"pos_embed has shape {pos_shape}, expected (1, tokens, {embed_dim})")
    length = pos_shape[1]
    no_embed_class = False
    grid = math.isqrt(max(length - num_prefix, 0))
    if grid * grid != length - num_prefix or grid == 0:
        # timm's no_embed_class models keep position embeddings for the patches only.
        grid = math.isqrt(length)
        if grid * grid != length or num_prefix == 0:
            raise StructureError(
                f"pos_embed has {length} positions, which is neither a square patch grid nor a square grid "
                f"plus {num_prefix} prefix tokens; non-square images are not supported"
            )
        no_embed_class = True
    return {
        "has_class_token": has_class_token,
        "has_dist_token": has_dist_token,
        "num_reg_tokens": num_reg_tokens,
        "num_prefix_tokens": num_prefix,
        "no_embed_class": no_embed_class,
        "img_size": grid * patch_size,
    }


def _usual_head_count(embed_dim: int) -> int | None:
    if embed_dim in _USUAL_HEADS:
        return _USUAL_HEADS[embed_dim]
    if embed_dim % _USUAL_HEAD_DIM == 0:
        return embed_dim // _USUAL_HEAD_DIM
    return None


def _heads_from_model_name(model_name: str, embed_dim: int) -> int:
    """Return the head count of a timm model, built on the meta device (no memory, no weights)."""
    import timm
    import torch

    if not timm.is_model(model_name):
        raise StructureError(
            f"unknown timm model name {model_name!r}; list ViT names with python -c "
            "\"import timm; print(timm.list_models('vit_*'))\""
        )
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks) or not hasattr(blocks[0], "attn"):
        raise StructureError(f"timm model {model_name!r} is not a VisionTransformer with blocks.N.attn")
    model_dim = getattr(model, "embed_dim", None)
    if model_dim != embed_dim:
        raise StructureError(
            f"timm model {model_name!r} has embedding width {model_dim} but the checkpoint has {embed_dim}; "
            "pass the model the checkpoint was trained with, or --heads"
        )
    return int(blocks[0].attn.num_heads)


def _heads_from_args(args: Mapping[str, Any], embed_dim: int) -> tuple[int, str] | None:
    for key in _ARGS_HEAD_KEYS:
        value = args.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"checkpoint args ({key}={value})"
    for key in _ARGS_MODEL_KEYS:
        value = args.get(key)
        if not isinstance(value, str):
            continue
        import timm  # only here, because importing timm (and torchvision) is slow

        if timm.is_model(value):
            try:
                return _heads_from_model_name(value, embed_dim), f"checkpoint args ({key}={value})"
            except StructureError as error:
                _logger.warning("ignoring %s=%r in the checkpoint args: %s", key, value, error)
    return None


def _zero_row_transitions(
    weights: Mapping[str, torch.Tensor],
    depth: int,
    attn_dims: list[int],
    stats: Mapping[str, ParameterStats] | None,
) -> list[int] | None:
    """Return the row offsets where zeroed qkv rows start or stop, or None when no block is head-pruned.

    A block counts only when its q, k and v parts zero the same rows, which
    is what head pruning does and unstructured pruning rarely does.
    """
    import torch

    index: ReparamIndex | None = None
    transitions: list[int] = []
    for block in range(depth):
        name = block_layer_names(block)["qkv"]
        item = stats.get(name) if stats is not None else None
        if item is not None and item.row_nonzero is not None:
            zero_rows = ~item.row_nonzero
        else:
            if index is None:
                index = index_reparametrization(weights.keys())
            zero_rows = _zero_qkv_rows(weights, name, index)
        zero_rows = zero_rows.reshape(3, attn_dims[block])
        if not bool(zero_rows.any()):
            continue
        if not (torch.equal(zero_rows[0], zero_rows[1]) and torch.equal(zero_rows[0], zero_rows[2])):
            return None
        pattern = zero_rows[0].to(torch.int8)
        changes = torch.nonzero(pattern[1:] != pattern[:-1]).flatten() + 1
        transitions += [int(c) for c in changes]
        transitions.append(attn_dims[block])
    return transitions or None


def _zero_qkv_rows(weights: Mapping[str, torch.Tensor], name: str, index: ReparamIndex) -> torch.Tensor:
    """Return, per row of the effective qkv weight ``name``, whether it is all zero.

    A mask saved beside a plain weight counts as applied, unless its shape
    differs (finding PD004 reports that).
    """
    qkv = effective_tensor(weights, name, index)
    mask_key = index.sidecar_masks.get(name)
    if mask_key is not None and tuple(weights[mask_key].shape) == tuple(qkv.shape):
        qkv = qkv * weights[mask_key].to(qkv.dtype)
    return (qkv == 0).all(dim=1)


def _heads_from_zero_rows(
    weights: Mapping[str, torch.Tensor],
    depth: int,
    embed_dim: int,
    attn_dims: list[int],
    stats: Mapping[str, ParameterStats] | None,
) -> int | None:
    """Infer the head count from the runs of zeroed qkv rows, or return None.

    Every run of zeroed rows starts and ends on a head boundary, so the head
    width divides every boundary offset and the embedding width. Runs of
    several adjacent pruned heads look like one wide head, so the widest
    width that fits is only an upper bound. The usual width for this
    embedding width wins when it fits too.
    """
    transitions = _zero_row_transitions(weights, depth, attn_dims, stats)
    if transitions is None:
        return None
    width = embed_dim
    for offset in transitions:
        width = math.gcd(width, offset)
    if width == embed_dim and all(t == embed_dim for t in transitions):
        return None  # because only whole blocks are zero, any head width fits
    usual = _usual_head_count(embed_dim)
    if usual is not None and width % (embed_dim // usual) == 0:
        return usual
    return embed_dim // width


def _assumed_heads(embed_dim: int) -> tuple[int, str]:
    usual = _usual_head_count(embed_dim)
    if usual is not None:
        plural = "s" if usual != 1 else ""
        if embed_dim in _USUAL_HEADS:
            reason = f"the head count of timm's ViTs of embedding width {embed_dim}"
        else:
            reason = f"the usual head width {_USUAL_HEAD_DIM}"
        return usual, (
            f"assumed: {usual} head{plural} of width {embed_dim // usual}, {reason}; "
            "pass --heads or --model to be sure"
        )
    head_dim = max(d for d in range(1, min(embed_dim, _USUAL_HEAD_DIM) + 1) if embed_dim % d == 0)
    heads = embed_dim // head_dim
    return heads, (
        f"assumed: {heads} head{'s' if heads != 1 else ''} of width {head_dim} (embedding width {embed_dim} "
        "has no usual head count); pass --heads or --model"
    )


def _resolve_heads(
    weights: Mapping[str, torch.Tensor],
    depth: int,
    embed_dim: int,
    attn_dims: list[int],
    heads: int | None,
    model_name: str | None,
    args: Mapping[str, Any] | None,
    stats: Mapping[str, ParameterStats] | None,
) -> tuple[int, str]:
    if heads is not None:
        if heads <= 0:
            raise StructureError(f"--heads {heads} is invalid: pass a positive head count")
        return heads, "--heads"
    if model_name:
        return _heads_from_model_name(model_name, embed_dim), f"model name {model_name}"
    if args:
        found = _heads_from_args(args, embed_dim)
        if found is not None:
            return found
    inferred = _heads_from_zero_rows(weights, depth, embed_dim, attn_dims, stats)
    if inferred is not None:
        return inferred, "inferred from zeroed qkv rows"
    return _assumed_heads(embed_dim)


def infer_architecture(
    weights: Mapping[str, torch.Tensor],
    *,
    heads: int | None = None,
    model_name: str | None = None,
    args: Mapping[str, Any] | None = None,
    stats: Mapping[str, ParameterStats] | None = None,
) -> VitArchitecture:
    """Read the architecture of a timm ViT from its state dict.

    Args:
        weights: State dict with timm names, either effective weights or with
            ``*_orig``/``*_mask`` pairs (shapes are read from ``*_orig``).
        heads: Head count of an unslimmed block, when the user knows it.
        model_name: timm model name to take the head count from (built on
            the meta device, so no memory or weights are used).
        args: Saved training arguments, searched for a head count
            (``num_heads``, ``heads``, ...) or a timm model name.
        stats: Stats measured on ``weights``
            (:func:`~prunedoctor.reparam.measure_parameters`). Where they
            hold the row flags of a qkv weight, the head count is inferred
            from those flags instead of the tensor data.

    Returns:
        The architecture. ``heads_source`` states where the head count came
        from, in the order of preference: ``heads``, ``model_name``, ``args``,
        the pattern of zeroed qkv rows, an assumption.

    Raises:
        StructureError: The state dict is not a timm ViT, its shapes do not
            agree, or the head count does not divide the widths.
    """
    shapes = _shapes(weights)
    depth = _count_blocks(shapes)
    _check_required(shapes, depth)
    patch_shape = shapes["patch_embed.proj.weight"]
    if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3]:
        raise StructureError(
            f"patch_embed.proj.weight has shape {patch_shape}, expected (D, channels, patch, patch) with "
            "square patches"
        )
    embed_dim, in_chans, patch_size = patch_shape[0], patch_shape[1], patch_shape[2]
    attn_dims, mlp_hidden = _read_block_widths(shapes, depth, embed_dim)
    tokens = _read_tokens(shapes, embed_dim, patch_size)

    num_heads, source = _resolve_heads(weights, depth, embed_dim, attn_dims, heads, model_name, args, stats)
    if embed_dim % num_heads:
        raise StructureError(
            f"head count {num_heads} (from {source}) does not divide the embedding width {embed_dim}"
        )
    head_dim = embed_dim // num_heads
    uneven = [f"block {i}: {a}" for i, a in enumerate(attn_dims) if a % head_dim]
    if uneven:
        raise StructureError(
            f"head count {num_heads} (from {source}) gives heads of width {head_dim}, which does not divide "
            f"the attention width of {', '.join(uneven)}; pass the right --heads"
        )

    block0 = "blocks.0."
    head_shape = shapes.get("head.weight")
    return VitArchitecture(
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        mlp_hidden=tuple(mlp_hidden),
        heads_per_block=tuple(a // head_dim for a in attn_dims),
        patch_size=patch_size,
        in_chans=in_chans,
        img_size=tokens["img_size"],
        num_prefix_tokens=tokens["num_prefix_tokens"],
        has_class_token=tokens["has_class_token"],
        num_reg_tokens=tokens["num_reg_tokens"],
        num_classes=head_shape[0] if head_shape else 0,
        heads_source=source,
        qkv_bias=f"{block0}attn.qkv.bias" in shapes,
        proj_bias=f"{block0}attn.proj.bias" in shapes,
        mlp_bias=f"{block0}mlp.fc1.bias" in shapes,
        qk_norm=f"{block0}attn.q_norm.weight" in shapes,
        layer_scale=f"{block0}ls1.gamma" in shapes,
        pre_norm="norm_pre.weight" in shapes,
        fc_norm="fc_norm.weight" in shapes,
        no_embed_class=tokens["no_embed_class"],
        has_dist_token=tokens["has_dist_token"],
        global_pool="avg" if "fc_norm.weight" in shapes or not tokens["has_class_token"] else "token",
    )


def infer_paired_architectures(
    weights_a: Mapping[str, torch.Tensor],
    weights_b: Mapping[str, torch.Tensor],
    *,
    heads: int | None = None,
    model_name: str | None = None,
    args_a: Mapping[str, Any] | None = None,
    args_b: Mapping[str, Any] | None = None,
    stats_a: Mapping[str, ParameterStats] | None = None,
    stats_b: Mapping[str, ParameterStats] | None = None,
) -> tuple[VitArchitecture, VitArchitecture]:
    """Infer the architectures of two checkpoints that are compared unit by unit, with one head count.

    When one head count is assumed and the other is not (a dense checkpoint
    beside its head-pruned successor), the known count is used for both.
    ``stats_a`` and ``stats_b`` are the stats measured on each state dict,
    if any (see :func:`infer_architecture`).

    Raises:
        StructureError: Either is not a ViT, or both head counts are known and differ.
    """
    from dataclasses import replace

    arch_a = infer_architecture(weights_a, heads=heads, model_name=model_name, args=args_a, stats=stats_a)
    arch_b = infer_architecture(weights_b, heads=heads, model_name=model_name, args=args_b, stats=stats_b)
    if arch_a.num_heads == arch_b.num_heads:
        return arch_a, arch_b
    if arch_a.heads_assumed and not arch_b.heads_assumed:
        arch_a = replace(infer_architecture(weights_a, heads=arch_b.num_heads), heads_source=arch_b.heads_source)
    elif arch_b.heads_assumed and not arch_a.heads_assumed:
        arch_b = replace(infer_architecture(weights_b, heads=arch_a.num_heads), heads_source=arch_a.heads_source)
    else:
        raise StructureError(
            f"the first checkpoint has {arch_a.num_heads} heads ({arch_a.heads_source}) but the second has "
            f"{arch_b.num_heads} ({arch_b.heads_source}); pass --heads"
        )
    return arch_a, arch_b


def build_timm_model(arch: VitArchitecture) -> nn.Module:
    """Build a timm ``VisionTransformer`` of this architecture with fresh random weights.

    No pretrained weights are downloaded. Blocks of a physically slimmed
    architecture get attention and MLP modules of their own widths.

    Returns:
        The model, in training mode, on the CPU.
    """
    import timm.models.vision_transformer as vit
    from torch import nn

    kwargs: dict[str, Any] = {
        "img_size": arch.img_size,
        "patch_size": arch.patch_size,
        "in_chans": arch.in_chans,
        "num_classes": arch.num_classes,
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "mlp_ratio": max(arch.mlp_hidden, default=arch.embed_dim) / arch.embed_dim,
        "qkv_bias": arch.qkv_bias,
        "proj_bias": arch.proj_bias,
        "qk_norm": arch.qk_norm,
        "init_values": 1e-5 if arch.layer_scale else None,
        "class_token": arch.has_class_token,
        "reg_tokens": arch.num_reg_tokens,
        "no_embed_class": arch.no_embed_class,
        "pre_norm": arch.pre_norm,
        "global_pool": arch.global_pool,
        "fc_norm": arch.fc_norm,
    }
    if arch.has_dist_token:
        from timm.models.deit import VisionTransformerDistilled

        model: nn.Module = VisionTransformerDistilled(**kwargs)
    else:
        model = vit.VisionTransformer(**kwargs)
    _slim_blocks(model, arch)
    return model


def _slim_blocks(model: nn.Module, arch: VitArchitecture) -> None:
    """Replace the attention and MLP modules whose widths differ from the architecture's."""
    from timm.layers import Attention, Mlp
    from torch import nn

    for i, block in enumerate(model.blocks):  # type: ignore[union-attr, arg-type]
        attn_dim = arch.attn_dim(i)
        if block.attn.qkv.out_features != 3 * attn_dim:
            block.attn = Attention(
                arch.embed_dim,
                num_heads=arch.heads_per_block[i],
                attn_head_dim=arch.head_dim,
                qkv_bias=arch.qkv_bias,
                proj_bias=arch.proj_bias,
                qk_norm=arch.qk_norm,
                norm_layer=nn.LayerNorm if arch.qk_norm else None,
            )
        if block.mlp.fc1.out_features != arch.mlp_hidden[i]:
            block.mlp = Mlp(
                arch.embed_dim,
                hidden_features=arch.mlp_hidden[i],
                act_layer=type(block.mlp.act),
                bias=arch.mlp_bias,
            )


def load_weights_strictly(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load effective weights into ``model`` with ``strict=True``.

    Raises:
        StructureError: Keys are missing or unexpected, or shapes differ; the
            message lists all of them, sorted.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(weights[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(weights)
        if tuple(weights[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatch " + ", ".join(mismatched))
    if problems:
        raise StructureError(
            "the weights do not load into the timm VisionTransformer built from the inferred architecture: "
            + "; ".join(problems)
        )
    model.load_state_dict(dict(weights), strict=True)
