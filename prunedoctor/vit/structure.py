"""Unit states of a ViT checkpoint: which heads and MLP neurons are alive, pruned or inconsistent.

For every head and neuron the input side (qkv rows, fc1 row) and the output
side (proj columns, fc2 column) are read from the effective weights, with a
mask applied where one exists:

- alive: neither side is entirely zero;
- pruned: both sides are entirely zero;
- inconsistent: exactly one side is entirely zero, so the unit still costs
  compute but contributes nothing, a sign that masks and weights disagree.

:func:`build_vit_report` returns these states with sparsity, parameter
counts and FLOPs as a JSON-able dict (the ``vit`` section of ``inspect
--json``); :func:`structure_findings` and :func:`compare_structure` turn
reports into findings for ``check``.

:func:`build_vit_report_from_stats` returns the same report from the
counts and the row and column flags that the analysis pass of ``inspect``
measured (:class:`~prunedoctor.reparam.ParameterStats`), without reading
tensor data again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prunedoctor.errors import StructureError
from prunedoctor.findings import Finding
from prunedoctor.reparam import MASK_SUFFIX, ORIG_SUFFIX
from prunedoctor.vit.arch import VitArchitecture, block_layer_names

if TYPE_CHECKING:
    import torch

    from prunedoctor.reparam import ParameterStats

__all__ = [
    "UnitStates",
    "compute_unit_states",
    "count_flops",
    "build_vit_report",
    "build_vit_report_from_stats",
    "has_structure_stats",
    "structure_findings",
    "compare_structure",
]

# Index lists longer than this are shortened in finding messages.
_SHOWN_INDICES = 8


class UnitStates:
    """Per-unit zero flags of one layer (the heads or the neurons of one block).

    Attributes:
        input_zero: Boolean per unit: the input side is entirely zero.
        output_zero: Boolean per unit: the output side is entirely zero.
    """

    def __init__(self, input_zero: torch.Tensor, output_zero: torch.Tensor) -> None:
        self.input_zero = input_zero
        self.output_zero = output_zero

    @property
    def pruned(self) -> torch.Tensor:
        """Boolean per unit: both sides are zero."""
        return self.input_zero & self.output_zero

    @property
    def inconsistent(self) -> torch.Tensor:
        """Boolean per unit: exactly one side is zero."""
        return self.input_zero ^ self.output_zero

    @property
    def alive(self) -> torch.Tensor:
        """Boolean per unit: neither side is zero."""
        return ~(self.input_zero | self.output_zero)


def _masked(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Return the weight with its mask applied (a no-op for merged pairs, decisive for sidecar masks)."""
    weight = weights[name]
    mask = masks.get(name)
    if mask is None or tuple(mask.shape) != tuple(weight.shape):
        return weight
    return weight * mask.to(weight.dtype)


class _Layers(Protocol):
    """Reader of a checkpoint's parameters for the report, with every applicable mask applied."""

    def zero_rows(self, name: str) -> torch.Tensor:
        """Return, per row of matrix ``name``, whether every entry is zero."""

    def zero_columns(self, name: str) -> torch.Tensor:
        """Return, per column of matrix ``name``, whether every entry is zero."""

    def count_zeros(self, name: str) -> int:
        """Count the zero entries of parameter ``name``."""

    def count_entries(self, name: str) -> int:
        """Count the entries of parameter ``name``."""

    def has(self, name: str) -> bool:
        """Return whether parameter ``name`` exists."""

    def count_params(self, prefix: str = "") -> int:
        """Count the entries of every parameter whose name starts with ``prefix``."""

    def count_nonzero(self) -> int:
        """Count the nonzero entries of every parameter."""


def _missing_layer_error(name: str, names: Any) -> StructureError:
    """Return the error for a block weight that is absent from the effective weights or the stats."""
    if name + ORIG_SUFFIX in names:
        return StructureError(
            f"{name} has no effective value because {name}{ORIG_SUFFIX} has no {name}{MASK_SUFFIX} beside it. "
            f"Save the mask with it, or save the merged {name}"
        )
    return StructureError(f"not a timm ViT state dict: {name} is missing")


class _TensorLayers:
    """Layers read from effective weights and masks (every call reads tensor data)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
        self._weights = weights
        self._masks = masks

    def _value(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            raise _missing_layer_error(name, self._weights)
        return _masked(self._weights, self._masks, name)

    def zero_rows(self, name: str) -> torch.Tensor:
        return (self._value(name) == 0).all(dim=1)

    def zero_columns(self, name: str) -> torch.Tensor:
        return (self._value(name) == 0).all(dim=0)

    def count_zeros(self, name: str) -> int:
        tensor = self._value(name)
        return tensor.numel() - int(tensor.count_nonzero())

    def count_entries(self, name: str) -> int:
        if name not in self._weights:
            raise _missing_layer_error(name, self._weights)
        return self._weights[name].numel()

    def has(self, name: str) -> bool:
        return name in self._weights

    def count_params(self, prefix: str = "") -> int:
        return sum(t.numel() for key, t in self._weights.items() if key.startswith(prefix))

    def count_nonzero(self) -> int:
        return sum(int(_masked(self._weights, self._masks, key).count_nonzero()) for key in self._weights)


def _applied_zeros(item: ParameterStats) -> int | None:
    """Return the zero entries of a measured entry with its mask applied, or None when unknown.

    The entry is ``orig * mask`` for a pair, ``value * mask`` for a plain
    tensor with a sidecar mask (the report counts the mask as applied), the
    mask itself for an orphan mask, and the value for any other tensor.
    """
    if item.kind == "orphan_mask":
        return item.mask_zeros
    if item.kind == "plain" and item.mask_key is not None:
        return item.masked_zeros
    return item.zeros


class _StatsLayers:
    """Layers read from measured stats (no tensor data is read)."""

    def __init__(self, stats: Mapping[str, ParameterStats]) -> None:
        self._stats = stats

    def _item(self, name: str) -> ParameterStats:
        item = self._stats.get(name)
        if item is None:
            raise _missing_layer_error(name, self._stats)
        return item

    def zero_rows(self, name: str) -> torch.Tensor:
        flags = self._item(name).row_nonzero
        if flags is None:
            raise StructureError(f"{name} was measured without row flags")
        return ~flags

    def zero_columns(self, name: str) -> torch.Tensor:
        flags = self._item(name).col_nonzero
        if flags is None:
            raise StructureError(f"{name} was measured without column flags")
        return ~flags

    def count_zeros(self, name: str) -> int:
        zeros = _applied_zeros(self._item(name))
        if zeros is None:
            raise StructureError(f"{name} was measured without a zero count of its masked value")
        return zeros

    def count_entries(self, name: str) -> int:
        return self._item(name).numel

    def has(self, name: str) -> bool:
        return name in self._stats

    def count_params(self, prefix: str = "") -> int:
        return sum(item.numel for name, item in self._stats.items() if name.startswith(prefix))

    def count_nonzero(self) -> int:
        return sum(item.numel - self.count_zeros(name) for name, item in self._stats.items())


def has_structure_stats(stats: Mapping[str, ParameterStats], arch: VitArchitecture) -> bool:
    """Return whether :func:`build_vit_report_from_stats` can build the report from ``stats``.

    It can when every entry has a zero count with its mask applied (so no
    pair failed to merge) and the qkv, proj, fc1 and fc2 weights of every
    block have row and column flags. Otherwise the caller builds the report
    from tensors with :func:`build_vit_report`, which also raises the error
    that explains what is missing.
    """
    if any(_applied_zeros(item) is None for item in stats.values()):
        return False
    for block in range(arch.depth):
        for name in block_layer_names(block).values():
            item = stats.get(name)
            if item is None or item.row_nonzero is None or item.col_nonzero is None:
                return False
    return True


def compute_unit_states(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], arch: VitArchitecture, block: int
) -> tuple[UnitStates, UnitStates]:
    """Return the head states and the neuron states of one block."""
    return _unit_states(_TensorLayers(weights, masks), arch, block)


def _unit_states(layers: _Layers, arch: VitArchitecture, block: int) -> tuple[UnitStates, UnitStates]:
    names = block_layer_names(block)
    heads, head_dim = arch.heads_per_block[block], arch.head_dim
    # Head h owns qkv rows p * A + h * d .. p * A + h * d + d - 1 for p in q, k, v and proj columns h * d ...
    qkv_rows = layers.zero_rows(names["qkv"]).reshape(3, heads, head_dim)
    proj_columns = layers.zero_columns(names["proj"]).reshape(heads, head_dim)
    head_states = UnitStates(qkv_rows.all(dim=2).all(dim=0), proj_columns.all(dim=1))
    neuron_states = UnitStates(layers.zero_rows(names["fc1"]), layers.zero_columns(names["fc2"]))
    return head_states, neuron_states


def count_flops(arch: VitArchitecture, heads: list[int], neurons: list[int]) -> dict[str, int]:
    """Count the multiply-accumulates (MACs) of one image through the model.

    With ``N`` tokens (patches plus prefix tokens), ``P`` patches, width
    ``D``, head width ``d``, and per block ``h`` heads and ``f`` MLP neurons:

    - patch embedding: ``P * D * in_chans * patch_size**2``;
    - per block: qkv ``N * D * 3hd``, attention scores ``h * N**2 * d``,
      attention-weighted values ``h * N**2 * d``, proj ``N * hd * D``,
      fc1 ``N * D * f``, fc2 ``N * f * D``;
    - classifier: ``D * num_classes`` (twice with a distillation head).

    Norms, softmax, activation functions and biases are not counted.

    Args:
        arch: The architecture.
        heads: Head count per block.
        neurons: MLP neuron count per block.

    Returns:
        ``patch_embed``, ``blocks`` (sum over blocks), ``head`` and ``total`` MACs.
    """
    tokens, patches, width, head_dim = arch.num_tokens, arch.num_patches, arch.embed_dim, arch.head_dim
    patch_embed = patches * width * arch.in_chans * arch.patch_size**2
    blocks = 0
    for h, f in zip(heads, neurons):
        attn_dim = h * head_dim
        blocks += tokens * width * 3 * attn_dim
        blocks += 2 * h * tokens * tokens * head_dim
        blocks += tokens * attn_dim * width
        blocks += 2 * tokens * width * f
    classifier = width * arch.num_classes * (2 if arch.has_dist_token else 1)
    total = patch_embed + blocks + classifier
    return {"patch_embed": patch_embed, "blocks": blocks, "head": classifier, "total": total}


def _removed_params(layers: _Layers, arch: VitArchitecture, block: int, pruned_heads: int, pruned_neurons: int) -> int:
    """Return the parameters that physically removing the pruned units of a block would drop."""
    names = block_layer_names(block)
    width, head_dim = arch.embed_dim, arch.head_dim
    qkv_bias = names["qkv"][: -len("weight")] + "bias"
    fc1_bias = names["fc1"][: -len("weight")] + "bias"
    per_head = 3 * head_dim * width + head_dim * width + (3 * head_dim if layers.has(qkv_bias) else 0)
    per_neuron = 2 * width + (1 if layers.has(fc1_bias) else 0)
    return pruned_heads * per_head + pruned_neurons * per_neuron


def _indices(flags: torch.Tensor) -> list[int]:
    import torch

    return torch.nonzero(flags).flatten().tolist()


def _block_entry(layers: _Layers, arch: VitArchitecture, block: int) -> dict[str, Any]:
    head_states, neuron_states = _unit_states(layers, arch, block)
    inconsistent_heads = _indices(head_states.inconsistent)
    input_zero = head_states.input_zero.tolist()
    zeros = entries = 0
    for name in block_layer_names(block).values():
        entries += layers.count_entries(name)
        zeros += layers.count_zeros(name)
    dense_params = layers.count_params(f"blocks.{block}.")
    pruned_heads = _indices(head_states.pruned)
    pruned_neurons = _indices(neuron_states.pruned)
    removed = _removed_params(layers, arch, block, len(pruned_heads), len(pruned_neurons))
    return {
        "index": block,
        "heads": {
            "total": arch.heads_per_block[block],
            "alive": _indices(head_states.alive),
            "pruned": pruned_heads,
            "inconsistent": inconsistent_heads,
            "inconsistent_zero_side": ["input" if input_zero[h] else "output" for h in inconsistent_heads],
        },
        "neurons": {
            "total": arch.mlp_hidden[block],
            "alive": int(neuron_states.alive.sum()),
            "pruned": len(pruned_neurons),
            "inconsistent": int(neuron_states.inconsistent.sum()),
            "inconsistent_input_zero": int((neuron_states.inconsistent & neuron_states.input_zero).sum()),
            "pruned_indices": pruned_neurons,
            "inconsistent_indices": _indices(neuron_states.inconsistent),
        },
        "zeros": zeros,
        "entries": entries,
        "sparsity": zeros / entries if entries else 0.0,
        "params": {"dense": dense_params, "remaining": dense_params - removed},
    }


def build_vit_report(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], arch: VitArchitecture
) -> dict[str, Any]:
    """Describe the heads and MLP neurons of every block, as a JSON-able dict.

    Args:
        weights: The effective state dict (``orig * mask`` merged), all keys.
        masks: Parameter name -> mask (pairs and masks saved beside plain
            weights); a sidecar mask counts as applied.
        arch: The architecture.

    Returns:
        A dict with these keys:

        - ``depth``, ``embed_dim``, ``heads``, ``head_dim``, ``heads_source``,
          ``heads_assumed``, and the image and token sizes;
        - ``blocks``, one entry per block: ``heads`` with ``alive``,
          ``pruned`` and ``inconsistent`` as index lists, ``neurons`` with
          ``alive``, ``pruned`` and ``inconsistent`` as counts plus
          ``pruned_indices`` and ``inconsistent_indices``, ``sparsity`` (zero
          fraction of the four weight matrices) and ``params``;
        - ``sparsity`` over all blocks;
        - ``params``: ``dense`` (every tensor), ``remaining`` (after
          physically removing pruned units) and ``nonzero``;
        - ``flops``: ``dense`` and ``remaining`` MACs per image (see :func:`count_flops`).

    Raises:
        StructureError: A block's qkv, proj, fc1 or fc2 weight is missing.
    """
    return _build_report(_TensorLayers(weights, masks), arch)


def build_vit_report_from_stats(stats: Mapping[str, ParameterStats], arch: VitArchitecture) -> dict[str, Any]:
    """Return the report of :func:`build_vit_report` from measured stats, without reading tensor data.

    Unit states come from the row and column flags of the qkv, proj, fc1
    and fc2 weights, and the counts from the zero counts, with pairs merged
    and sidecar masks applied as :func:`build_vit_report` applies them.

    NOTE: :func:`build_vit_report` multiplies a merged pair by its mask a
    second time. For a mask that is not binary, that second product can
    underflow to zero where ``orig * mask`` is not zero, so the two reports
    can differ on such a file. For binary masks they are the same.

    Args:
        stats: Parameter name -> stats of the state dict, as
            :func:`~prunedoctor.reparam.measure_parameters` or
            :func:`~prunedoctor.inspection.analyze_checkpoint` returns them.
        arch: The architecture.

    Raises:
        StructureError: ``stats`` lack what the report needs; check with
            :func:`has_structure_stats` first.
    """
    return _build_report(_StatsLayers(stats), arch)


def _build_report(layers: _Layers, arch: VitArchitecture) -> dict[str, Any]:
    blocks = [_block_entry(layers, arch, block) for block in range(arch.depth)]
    zeros = sum(b["zeros"] for b in blocks)
    entries = sum(b["entries"] for b in blocks)
    dense_params = layers.count_params()
    removed = sum(b["params"]["dense"] - b["params"]["remaining"] for b in blocks)
    nonzero = layers.count_nonzero()
    remaining_heads = [b["heads"]["total"] - len(b["heads"]["pruned"]) for b in blocks]
    remaining_neurons = [b["neurons"]["total"] - b["neurons"]["pruned"] for b in blocks]
    return {
        "depth": arch.depth,
        "embed_dim": arch.embed_dim,
        "heads": arch.num_heads,
        "head_dim": arch.head_dim,
        "heads_source": arch.heads_source,
        "heads_assumed": arch.heads_assumed,
        "mlp_hidden": list(arch.mlp_hidden),
        "patch_size": arch.patch_size,
        "img_size": arch.img_size,
        "in_chans": arch.in_chans,
        "num_prefix_tokens": arch.num_prefix_tokens,
        "num_tokens": arch.num_tokens,
        "num_classes": arch.num_classes,
        "blocks": blocks,
        "zeros": zeros,
        "entries": entries,
        "sparsity": zeros / entries if entries else 0.0,
        "params": {"dense": dense_params, "remaining": dense_params - removed, "nonzero": nonzero},
        "flops": {
            "dense": count_flops(arch, list(arch.heads_per_block), list(arch.mlp_hidden))["total"],
            "remaining": count_flops(arch, remaining_heads, remaining_neurons)["total"],
        },
    }


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _shorten(indices: list[int]) -> str:
    listed = ", ".join(str(i) for i in indices[:_SHOWN_INDICES])
    return listed + (f", ... ({len(indices)} in all)" if len(indices) > _SHOWN_INDICES else "")


def structure_findings(report: Mapping[str, Any], *, min_heads: int = 1) -> list[Finding]:
    """Return the structure findings of one report.

    Codes: PD020 inconsistent head (error, one per head), PD021 inconsistent
    neurons (error, one per block), PD022 a block with fewer than
    ``min_heads`` alive heads (error), PD025 head count assumed (warning).
    """
    findings: list[Finding] = []
    if report.get("heads_assumed"):
        message = f"head count {report['heads']}: {report['heads_source']}"
        findings.append(Finding("PD025", "warning", "<architecture>", message))
    for block in report["blocks"]:
        i = block["index"]
        heads = block["heads"]
        for head, side in zip(heads["inconsistent"], heads["inconsistent_zero_side"]):
            zero, other = ("qkv rows", "proj columns") if side == "input" else ("proj columns", "qkv rows")
            findings.append(
                Finding(
                    "PD020",
                    "error",
                    f"blocks.{i}.attn",
                    f"block {i} head {head}: its {zero} are all zero but its {other} are not, so the head "
                    "is half-pruned; prune or restore both sides",
                )
            )
        neurons = block["neurons"]
        if neurons["inconsistent"]:
            findings.append(
                Finding(
                    "PD021",
                    "error",
                    f"blocks.{i}.mlp",
                    f"block {i}: {_plural(neurons['inconsistent'], 'MLP neuron')} with exactly one of fc1 row "
                    f"and fc2 column all zero ({neurons['inconsistent_input_zero']} with the fc1 row zero); "
                    f"indices {_shorten(neurons['inconsistent_indices'])}",
                )
            )
        alive = len(heads["alive"])
        if alive < min_heads:
            findings.append(
                Finding(
                    "PD022",
                    "error",
                    f"blocks.{i}.attn",
                    f"block {i} keeps {_plural(alive, 'alive head')} of {heads['total']}, "
                    f"fewer than the minimum {min_heads}",
                )
            )
    return findings


def _check_comparable(previous: Mapping[str, Any], report: Mapping[str, Any]) -> None:
    if previous["depth"] != report["depth"]:
        raise StructureError(
            f"cannot compare structures: the previous checkpoint has {previous['depth']} blocks, this one "
            f"{report['depth']}"
        )
    for before, after in zip(previous["blocks"], report["blocks"]):
        for kind in ("heads", "neurons"):
            if before[kind]["total"] != after[kind]["total"]:
                raise StructureError(
                    f"cannot compare structures: block {after['index']} has {before[kind]['total']} {kind} in "
                    f"the previous checkpoint and {after[kind]['total']} in this one; unit indices would not match"
                )


def compare_structure(previous: Mapping[str, Any], report: Mapping[str, Any]) -> list[Finding]:
    """Return the findings of a checkpoint against the one it was pruned from.

    Codes: PD023 a head or neuron that was pruned in ``previous`` is not
    pruned now (error, one per block and kind), PD024 the sparsity of the
    qkv, proj, fc1 and fc2 weights decreased (error).

    Raises:
        StructureError: The two reports differ in depth or in unit counts.
    """
    _check_comparable(previous, report)
    findings: list[Finding] = []
    for before, after in zip(previous["blocks"], report["blocks"]):
        i = after["index"]
        revived_heads = sorted(set(before["heads"]["pruned"]) - set(after["heads"]["pruned"]))
        if revived_heads:
            several = len(revived_heads) > 1
            findings.append(
                Finding(
                    "PD023",
                    "error",
                    f"blocks.{i}.attn",
                    f"block {i}: head{'s' if several else ''} {_shorten(revived_heads)} "
                    f"{'were' if several else 'was'} pruned in the previous checkpoint and "
                    f"{'are' if several else 'is'} not pruned in this one",
                )
            )
        revived_neurons = sorted(set(before["neurons"]["pruned_indices"]) - set(after["neurons"]["pruned_indices"]))
        if revived_neurons:
            findings.append(
                Finding(
                    "PD023",
                    "error",
                    f"blocks.{i}.mlp",
                    f"block {i}: {_plural(len(revived_neurons), 'MLP neuron')} pruned in the previous checkpoint "
                    f"{'are' if len(revived_neurons) > 1 else 'is'} not pruned in this one "
                    f"(indices {_shorten(revived_neurons)})",
                )
            )
    # Cross-multiplied integer counts compare the two zero fractions exactly.
    if report["zeros"] * previous["entries"] < previous["zeros"] * report["entries"]:
        findings.append(
            Finding(
                "PD024",
                "error",
                "<structure>",
                f"sparsity of the qkv, proj, fc1 and fc2 weights decreased from {previous['sparsity']:.2%} to "
                f"{report['sparsity']:.2%}",
            )
        )
    return findings
