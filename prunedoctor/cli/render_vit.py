"""Rich rendering of the ViT structure report, the ``prune`` report and the ``diff`` report.

Each function takes a console and a JSON-able report from the library and
prints tables with a legend, so that every number on screen states what it
counts. User-controlled strings (paths, keys, head-count sources) go into
:class:`rich.text.Text` objects, never into markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "render_vit_report",
    "render_heads_map",
    "render_prune_report",
    "render_diff_report",
    "format_count",
    "format_bytes",
]

# Indices shown in one table cell before the rest is summarised.
_SHOWN_INDICES = 12
_ALIVE, _PRUNED, _INCONSISTENT = "■", "·", "◧"
_PRUNABLE = "qkv, proj, fc1 and fc2 weights"


def format_count(value: int | float) -> str:
    """Return a count with a K, M or G suffix (powers of 1000) above a thousand, as in ``1.23M``."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}"
    return f"{value:,.0f}"


def format_bytes(size: int | None) -> str:
    """Return a file size in B, KB, MB or GB (powers of 1000)."""
    if size is None:
        return "-"
    for threshold, suffix in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if size >= threshold:
            return f"{size / threshold:.1f} {suffix}"
    return f"{size} B"


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def _fields() -> Table:
    """Return a two-column grid of labels and values."""
    grid = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    return grid


def _indices(indices: Sequence[int], style: str = "") -> Text:
    """Return unit indices as ``#0, #2``, so that a column of indices is not read as counts."""
    if not indices:
        return Text("-", style="dim")
    listed = ", ".join(f"#{i}" for i in indices[:_SHOWN_INDICES])
    if len(indices) > _SHOWN_INDICES:
        listed += f", ... ({len(indices)})"
    return Text(listed, style=style)


def _percent(value: float) -> str:
    return f"{value:.2%}"


def _heads_text(heads: int, head_dim: int, source: str, assumed: bool) -> Text:
    text = Text(f"{heads} per block, width {head_dim}; head count source: ")
    text.append(source, style="yellow" if assumed else "")
    return text


def render_heads_map(console: Console, report: Mapping[str, Any]) -> None:
    """Print the blocks-by-heads map: one row per block, one column per head."""
    widest = max((b["heads"]["total"] for b in report["blocks"]), default=0)
    if widest == 0:
        return
    label_width = len(f"block {report['depth'] - 1}")
    header = Text(" " * (label_width + 2))
    for head in range(widest):
        header.append(f"{head % 10} ", style="dim")
    console.print(header)

    for block in report["blocks"]:
        heads = block["heads"]
        pruned, inconsistent = set(heads["pruned"]), set(heads["inconsistent"])
        row = Text(f"block {block['index']}".ljust(label_width) + "  ")
        for head in range(heads["total"]):
            if head in pruned:
                row.append(_PRUNED + " ", style="dim")
            elif head in inconsistent:
                row.append(_INCONSISTENT + " ", style="bold red")
            else:
                row.append(_ALIVE + " ", style="green")
        console.print(row)

    legend = Text(" " * (label_width + 2))
    legend.append(_ALIVE, style="green")
    legend.append(" alive  ")
    legend.append(_PRUNED, style="dim")
    legend.append(" pruned  ")
    legend.append(_INCONSISTENT, style="bold red")
    legend.append(" inconsistent")
    if widest > 10:
        legend.append("  (column labels: head index mod 10)", style="dim")
    console.print(legend)


def render_vit_report(console: Console, report: Mapping[str, Any]) -> None:
    """Print the ViT structure section: architecture, per-block table, heads map and totals."""
    console.print(Text("ViT structure", style="bold"))
    hidden = sorted(set(report["mlp_hidden"]))
    mlp = str(hidden[0]) if len(hidden) == 1 else f"{hidden[0]} to {hidden[-1]}"
    fields = _fields()
    fields.add_row("blocks", f"{report['depth']}, width {report['embed_dim']}, MLP width {mlp}")
    fields.add_row("heads", _heads_text(report["heads"], report["head_dim"], report["heads_source"],
                                        report["heads_assumed"]))
    fields.add_row(
        "input",
        f"{report['img_size']}x{report['img_size']} images, {report['patch_size']}x{report['patch_size']} patches, "
        f"{report['num_tokens']} tokens ({report['num_prefix_tokens']} prefix)",
    )
    console.print(fields)
    console.print()

    table = _table("Heads and MLP neurons per block")
    table.add_column("block", justify="right", no_wrap=True)
    table.add_column("heads\nalive", justify="right", no_wrap=True)
    table.add_column("heads\npruned", overflow="fold")
    table.add_column("heads\ninconsistent", overflow="fold", min_width=12)
    table.add_column("neurons\nalive", justify="right", no_wrap=True)
    table.add_column("neurons\npruned", justify="right", no_wrap=True)
    table.add_column("neurons\ninconsistent", justify="right", no_wrap=True)
    table.add_column("zeros", justify="right", no_wrap=True)
    for block in report["blocks"]:
        heads, neurons = block["heads"], block["neurons"]
        inconsistent_neurons = neurons["inconsistent"]
        table.add_row(
            str(block["index"]),
            f"{len(heads['alive'])}/{heads['total']}",
            _indices(heads["pruned"]),
            _indices(heads["inconsistent"], "bold red"),
            f"{neurons['alive']}/{neurons['total']}",
            str(neurons["pruned"]),
            Text(str(inconsistent_neurons), style="bold red" if inconsistent_neurons else ""),
            f"{block['sparsity']:.1%}",
        )
    console.print(table)
    render_heads_map(console, report)
    console.print()

    params, flops = report["params"], report["flops"]
    totals = _fields()
    totals.add_row("sparsity", f"{_percent(report['sparsity'])} of the {_PRUNABLE} "
                               f"({report['zeros']:,} of {report['entries']:,} entries are zero)")
    totals.add_row("parameters", f"{params['dense']:,} stored, {params['remaining']:,} once pruned heads and "
                                 f"neurons are removed, {params['nonzero']:,} nonzero")
    saved = f" ({1 - flops['remaining'] / flops['dense']:.1%} fewer)" if flops["dense"] else ""
    totals.add_row("FLOPs", f"{format_count(flops['dense'])} multiply-accumulates per image as stored, "
                            f"{format_count(flops['remaining'])} without pruned heads and neurons{saved}")
    console.print(totals)
    console.print(
        Text(
            "A head or neuron is pruned when its input side (qkv rows, fc1 row) and its output side (proj "
            "columns, fc2 column) are all zero, alive when neither is, and inconsistent when only one is. "
            "zeros: zero entries of the block's four weight matrices.",
            style="dim",
        )
    )


def _budget_text(config: Mapping[str, Any]) -> str:
    if config["refill"]:
        kind = "Refill" if config["refill_rate"] == 0 else "Refill+"
        return (f"{kind}: global magnitude pruning of {config['rate']:.0%} of the surviving weights, refill rate "
                f"{config['refill_rate']:g}")
    parts = []
    if config["target"] in ("head", "both"):
        parts.append(f"prune {config['head_ratio']:.0%} of the heads")
    if config["target"] in ("mlp", "both"):
        parts.append(f"prune {config['mlp_ratio']:.0%} of the MLP neurons")
    return "ratio: " + ", ".join(parts)


def render_prune_report(console: Console, report: Mapping[str, Any]) -> None:
    """Print what ``prune`` kept and pruned per block, the budget and the before/after totals."""
    config, arch = report["config"], report["architecture"]
    fields = _fields()
    fields.add_row("read", Text(str(report["input"])))
    written = format_bytes(report["bytes_written"])
    fields.add_row("wrote", Text(f"{report['output']} ({report['output_as']}, {written})"))
    if report.get("masks_out"):
        fields.add_row("masks", Text(f"{report['masks_out']} ({format_bytes(report['masks_bytes_written'])})"))
    criterion = config["criterion"] + (", input and output sides" if config["include_output_side"] else "")
    fields.add_row("criterion", criterion)
    fields.add_row("sorting", f"{config['sorting']}; score normalisation: {report['normalization']}")
    fields.add_row("target", f"{config['target']}, at least {config['min_keep']} kept per layer"
                             + ("; biases of pruned units masked" if config["mask_bias"] else ""))
    fields.add_row("budget", _budget_text(config))
    if report.get("refill"):
        fields.add_row(
            "mask M",
            f"{_percent(report['refill']['unstructured_sparsity'])} of the {_PRUNABLE} pruned. Each layer keeps "
            "as many units as M's surviving input-side entries would fill.",
        )
    fields.add_row("heads", _heads_text(arch["heads"], arch["head_dim"], arch["heads_source"],
                                        arch["heads_source"].startswith("assumed")))
    calibration = report.get("calibration")
    if calibration:
        resized = f", resized from {calibration['resized_from']}px" if calibration["resized_from"] else ""
        fields.add_row("calibration", Text(f"{_count(calibration['images'], 'image')} in {_count(calibration['batches'], 'batch')} "
                                           f"from {calibration['source']}{resized}"))
    console.print(fields)
    console.print()

    table = _table("Kept and pruned units per block")
    table.add_column("block", justify="right")
    table.add_column("heads\nkept")
    table.add_column("heads\npruned")
    table.add_column("neurons\nkept", justify="right")
    table.add_column("neurons\npruned", justify="right")
    for block in report["blocks"]:
        heads, neurons = block["heads"], block["neurons"]
        table.add_row(
            str(block["index"]),
            _indices(heads["kept"], "green"),
            _indices(heads["pruned"], "dim"),
            f"{neurons['kept']}/{neurons['total']}",
            str(neurons["pruned"]),
        )
    console.print(table)

    sparsity, params, flops = report["sparsity"], report["params"], report["flops"]
    totals = _fields()
    totals.add_row("sparsity", f"{_percent(sparsity['before'])} -> {_percent(sparsity['after'])} of the "
                               f"{sparsity['scope']}")
    totals.add_row("parameters", f"{params['before']['remaining']:,} -> {params['after']['remaining']:,} once "
                                 "pruned heads and neurons are removed")
    before, after = format_count(flops["before"]["remaining"]), format_count(flops["after"]["remaining"])
    totals.add_row("FLOPs", f"{before} -> {after} "
                            "multiply-accumulates per image without pruned units")
    seconds = report.get("seconds")
    if seconds:
        totals.add_row("time", f"load {seconds['load']:.2f} s, pruning {seconds['prune']:.2f} s")
    console.print(totals)
    console.print(
        Text(
            "Kept units get masks of ones on both sides, so entries inside them that the old mask had pruned "
            "become trainable again, with the value 0; pruned units get masks of zeros.",
            style="dim",
        )
    )


def _diff_tensor_table(report: Mapping[str, Any]) -> Table:
    table = _table("Tensors that differ")
    table.add_column("tensor", overflow="fold")
    table.add_column("changed\nentries", justify="right")
    table.add_column("max\n|A-B|", justify="right")
    table.add_column("rel.\nL2", justify="right")
    table.add_column("within\ntolerance")
    for entry in report["tensors"]:
        within = entry["within_tolerance"]
        table.add_row(
            Text(entry["key"]),
            f"{entry['changed']:,}",
            "-" if entry["max_abs"] is None else f"{entry['max_abs']:.3g}",
            "-" if entry["rel_l2"] is None else f"{entry['rel_l2']:.3g}",
            Text("yes" if within else "no", style="green" if within else "bold red"),
        )
    return table


def _diff_structure_table(structure: Mapping[str, Any]) -> Table:
    table = _table("Heads and neurons that changed state")
    table.add_column("block", justify="right")
    table.add_column("heads\npruned")
    table.add_column("heads\nrevived")
    table.add_column("neurons\npruned", justify="right")
    table.add_column("neurons\nrevived", justify="right")
    for block in structure["blocks"]:
        revived_neurons = len(block["neurons_revived"])
        table.add_row(
            str(block["index"]),
            _indices(block["heads_pruned"]),
            _indices(block["heads_revived"], "bold red"),
            str(len(block["neurons_pruned"])),
            Text(str(revived_neurons), style="bold red" if revived_neurons else ""),
        )
    return table


def _key_list(keys: Sequence[str]) -> Text:
    return Text(", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else ""), style="yellow")


def _count(count: int, noun: str) -> str:
    plural = noun + "es" if noun.endswith(("ch", "sh", "s", "x")) else noun + "s"
    return f"{count:,} {noun if count == 1 else plural}"


def _with_article(scope: str) -> str:
    """Return ``scope`` after "the", unless it starts with "all" ("all floating-point tensors")."""
    return scope if scope.startswith("all ") else f"the {scope}"


def render_diff_report(console: Console, report: Mapping[str, Any]) -> None:
    """Print the diff summary: keys, values, masks, units per block, sparsity and the verdict."""
    view = "effective weights (orig * mask)" if report["view"] == "effective" else "raw keys as stored"
    fields = _fields()
    fields.add_row("A", Text(str(report.get("a", "A"))))
    fields.add_row("B", Text(str(report.get("b", "B"))))
    fields.add_row("compared", f"{view}; tolerance atol {report['atol']:g}, rtol {report['rtol']:g}")
    fields.add_row("keys", f"{report['keys_compared']:,} in both, {len(report['only_in_a'])} only in A, "
                           f"{len(report['only_in_b'])} only in B")
    if report["only_in_a"]:
        fields.add_row("only in A", _key_list(report["only_in_a"]))
    if report["only_in_b"]:
        fields.add_row("only in B", _key_list(report["only_in_b"]))
    for change in report["shape_changes"]:
        fields.add_row("shape", Text(f"{change['key']}: {tuple(change['a'])} -> {tuple(change['b'])}", style="yellow"))
    for change in report["dtype_changes"]:
        fields.add_row("dtype", Text(f"{change['key']}: {change['a']} -> {change['b']}", style="yellow"))
    fields.add_row("values", f"{_count(report['identical'], 'tensor')} identical, {len(report['tensors']):,} differ")

    masks = report["masks"]
    if masks:
        newly = sum(m["newly_pruned"] for m in masks)
        revived = sum(m["revived"] for m in masks)
        fields.add_row("mask entries", f"{newly:,} newly pruned (0 in B, not in A), {revived:,} revived (0 in A, not "
                                       f"in B), in {_count(len(masks), 'parameter')}")
    else:
        fields.add_row("mask entries", "no change")

    structure = report["structure"]
    if structure is not None:
        heads = Text(f"{structure['heads']} per block; head count source: ")
        heads.append(structure["heads_source"], style="yellow" if structure["heads_assumed"] else "")
        fields.add_row("heads", heads)
    console.print(fields)
    console.print()

    if report["tensors"]:
        console.print(_diff_tensor_table(report))
        console.print(
            Text(
                "max |A-B|: largest difference of one entry. rel. L2: ||A-B|| / max(||A||, ||B||). Within "
                "tolerance: every entry has |A-B| <= atol + rtol * |B|.",
                style="dim",
            )
        )
        console.print()
    if structure is not None:
        console.print(_diff_structure_table(structure))
        console.print(
            Text("pruned: both sides zero in B but not in A. revived: both sides zero in A but not in B.",
                 style="dim")
        )
        console.print()
    elif report.get("structure_note"):
        console.print(Text(f"heads and neurons not compared: {report['structure_note']}", style="dim"))

    sparsity = report["sparsity"]
    console.print(
        f"sparsity of {_with_article(sparsity['scope'])}: {_percent(sparsity['a'])} -> {_percent(sparsity['b'])} "
        f"({sparsity['change'] * 100:+.2f} points)"
    )
    if report["equal"]:
        console.print(Text("equal within tolerance (exit 0)", style="bold green"))
    else:
        console.print(Text("different (exit 1)", style="bold red"))
