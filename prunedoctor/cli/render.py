"""Rich rendering of the inspect report, the check results and the normalize summary.

The functions take the library's JSON-able report or result objects and a
:class:`rich.console.Console`, so tests can render into a fixed-width
console. User strings (paths, keys, messages) go into :class:`rich.text.Text`
objects, never into markup, so brackets in a key cannot break the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from prunedoctor.cli.render_vit import render_vit_report
from prunedoctor.findings import FINDING_CODES

if TYPE_CHECKING:
    from prunedoctor.checks import CheckResult
    from prunedoctor.normalize import NormalizeResult

__all__ = [
    "SECTION_RENDERERS",
    "format_bytes",
    "format_github",
    "format_percent",
    "render_check",
    "render_inspect",
    "render_normalize",
]

SEVERITY_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
FORMAT_NAMES = {"torch-zip": "torch zip", "torch-legacy": "legacy torch pickle", "safetensors": "safetensors"}
# A code with more findings than this is shown as one row with its keys, not one row per key.
_GROUP_THRESHOLD = 3
# Layers shown in the sparsity table without --tensors.
_LAYER_ROWS = 24


SectionRenderer = Callable[[Any, Console], None]
# Report section name -> function that prints it. A section without a
# renderer is mentioned in one line and shown in full by --json.
SECTION_RENDERERS: dict[str, SectionRenderer] = {
    "vit": lambda section, console: render_vit_report(console, section),
}

_CORE_REPORT_KEYS = frozenset({
    "schema", "file", "format", "size_bytes", "container", "container_reason", "candidates", "prefixes",
    "metadata", "args", "unsafe_globals", "tensors", "parameter_tensors", "parameters", "bytes", "dtypes",
    "reparametrized", "sidecar_masks", "mask_bytes", "sparsity", "findings", "finding_counts", "tensor_list",
    "skipped_sections",
})


def format_bytes(size: int) -> str:
    """Return ``size`` in B, KiB, MiB or GiB with one decimal (``351.2 KiB``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_percent(fraction: float | None) -> str:
    """Return a fraction as a percentage with one decimal, or an en dash when unknown."""
    return "–" if fraction is None else f"{100 * fraction:.1f} %"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _field_table() -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def render_inspect(report: dict[str, Any], console: Console, *, show_tensors: bool = False) -> None:
    """Print the inspect report: a summary, layer sparsity, findings and, on request, every tensor."""
    console.print(Text(report["file"], style="bold"), soft_wrap=True)
    console.print(_summary_table(report))
    console.print()

    layers = report["sparsity"]["layers"]
    if layers:
        console.print(_layer_table(layers, show_all=show_tensors))
        console.print()
    for name, section in _extra_sections(report).items():
        renderer = SECTION_RENDERERS.get(name)
        if renderer is not None:
            renderer(section, console)
        else:
            console.print(Text(f"{name}: {len(section)} entries; --json shows this section", style="dim"))
        console.print()

    for name, reason in report.get("skipped_sections", {}).items():
        console.print(Text(f"{name} section skipped: {reason}", style="yellow"), soft_wrap=True)
        console.print()
    if show_tensors and "tensor_list" in report:
        console.print(_tensor_table(report["tensor_list"]))
        console.print()

    console.print(_findings_block(report["findings"]))
    counts = report["finding_counts"]
    console.print(
        Text.assemble(
            (_plural(counts["error"], "error"), SEVERITY_STYLES["error"] if counts["error"] else "green"),
            ", ",
            (_plural(counts["warning"], "warning"), SEVERITY_STYLES["warning"] if counts["warning"] else ""),
            f", {_plural(counts['info'], 'note')}",
        )
    )


def _summary_table(report: dict[str, Any]) -> Table:
    table = _field_table()
    table.add_row("format", f"{FORMAT_NAMES.get(report['format'], report['format'])}, "
                            f"{format_bytes(report['size_bytes'])} on disk")
    container = report["container"]
    table.add_row("state dict", Text(f"{container!r}: {report['container_reason']}" if container
                                     else report["container_reason"]))
    others = [candidate["path"] for candidate in report["candidates"] if candidate["path"] != container]
    if others:
        table.add_row("other candidates", Text(", ".join(repr(path) for path in others) + " (choose with --select)"))
    table.add_row("prefixes", Text("stripped " + " ".join(repr(p) for p in report["prefixes"]))
                  if report["prefixes"] else "none")

    masks = len(report["reparametrized"]) + len(report["sidecar_masks"])
    dtypes = ", ".join(f"{name} ×{count}" for name, count in report["dtypes"].items())
    table.add_row(
        "tensors",
        f"{report['tensors']} stored ({format_bytes(report['bytes'])}): {_plural(report['parameter_tensors'], 'parameter')} "
        f"with {report['parameters']:,} entries, {_plural(masks, 'mask')}; {dtypes or 'no tensors'}",
    )
    if report["reparametrized"]:
        share = report["mask_bytes"] / report["bytes"] if report["bytes"] else 0.0
        table.add_row(
            "reparametrized",
            Text(f"{_plural(len(report['reparametrized']), 'parameter')} stored as _orig/_mask pairs; masks take "
                 f"{format_bytes(report['mask_bytes'])} ({format_percent(share)} of the tensor bytes)",
                 style=SEVERITY_STYLES["error"]),
        )
    elif report["sidecar_masks"]:
        table.add_row("masks", f"{_plural(len(report['sidecar_masks']), 'mask')} saved beside merged weights "
                               f"({format_bytes(report['mask_bytes'])})")
    else:
        table.add_row("reparametrized", Text("none", style="green"))

    sparsity = report["sparsity"]
    table.add_row(
        "sparsity",
        f"{format_percent(sparsity['global'])} global: {sparsity['zeros']:,} of {sparsity['entries']:,} "
        "weight entries are zero",
    )
    if sparsity["masks"] is not None:
        table.add_row(
            "",
            f"{format_percent(sparsity['masks'])} of the {sparsity['masked_entries']:,} masked entries are 0 "
            f"in the masks ({format_percent(sparsity['masked_values'])} zero after merging)",
        )

    if report.get("args"):
        args = ", ".join(f"{key}={value}" for key, value in list(report["args"].items())[:8])
        more = f" (+{len(report['args']) - 8} more)" if len(report["args"]) > 8 else ""
        table.add_row("saved args", Text(args + more))
    if report["metadata"]:
        table.add_row("other entries", Text(", ".join(report["metadata"])))
    return table


def _layer_table(layers: list[dict[str, Any]], *, show_all: bool) -> Table:
    interesting = [layer for layer in layers if layer["mask_sparsity"] is not None or layer["zeros"]]
    rows = layers if show_all else interesting[:_LAYER_ROWS]
    hidden = len(layers) - len(rows)
    caption = f"{hidden} more layers without zeros or masks; --tensors shows all" if hidden and not show_all else None
    table = Table(title="Layer sparsity", title_justify="left", box=box.SIMPLE_HEAD, caption=caption,
                  caption_justify="left", pad_edge=False)
    table.add_column("parameter", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("zeros", justify="right", no_wrap=True)
    table.add_column("mask zeros", justify="right", no_wrap=True)
    for layer in rows:
        table.add_row(
            Text(layer["name"]),
            "×".join(str(size) for size in layer["shape"]) or "scalar",
            layer["dtype"],
            format_percent(layer["sparsity"]),
            format_percent(layer["mask_sparsity"]),
        )
    return table


def _tensor_table(tensors: list[dict[str, Any]]) -> Table:
    table = Table(title="Stored tensors", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("key", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("role", no_wrap=True)
    for item in tensors:
        table.add_row(Text(item["key"]), "×".join(str(size) for size in item["shape"]) or "scalar",
                      item["dtype"], format_bytes(item["bytes"]), item["role"])
    return table


def _findings_block(findings: Sequence[dict[str, Any]]) -> Table | Text:
    if not findings:
        return Text("No findings.", style="green")
    table = Table(title=f"Findings ({len(findings)})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("code", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("key", overflow="fold", max_width=40)
    table.add_column("message", overflow="fold", ratio=1)
    for code, group in _group_by_code(findings):
        severity = group[0]["severity"]
        style = SEVERITY_STYLES.get(severity, "")
        if len(group) > _GROUP_THRESHOLD:
            message = f"{FINDING_CODES.get(code, code)}. First: {group[0]['message']}"
            table.add_row(code, Text(severity, style=style), Text(f"{len(group)} keys"), Text(message))
            continue
        for item in group:
            table.add_row(code, Text(item["severity"], style=SEVERITY_STYLES.get(item["severity"], "")),
                          Text(item["key"]), Text(item["message"]))
    return table


def _group_by_code(findings: Iterable[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in findings:
        groups.setdefault(item["code"], []).append(item)
    return sorted(groups.items())


def _extra_sections(report: dict[str, Any]) -> dict[str, Any]:
    """Return the report's sections beyond the core keys that build_report always writes."""
    return {key: value for key, value in report.items() if key not in _CORE_REPORT_KEYS}


def _print_field(console: Console, label: str, value: str, style: str = "") -> None:
    # soft_wrap leaves long paths whole, so they can be copied from the terminal.
    console.print(Text.assemble((f"{label:<11}", "bold"), (value, style)), soft_wrap=True)


def render_normalize(result: NormalizeResult, console: Console) -> None:
    """Print what normalize merged, dropped and wrote."""
    _print_field(console, "read", f"{result.input} ({format_bytes(result.input_bytes)})")
    if result.container:
        _print_field(console, "state dict", f"taken from {result.container!r}; the other entries are left out")
    if result.prefixes:
        _print_field(console, "prefixes", "stripped " + " ".join(repr(prefix) for prefix in result.prefixes))
    _print_field(console, "merged", f"{_plural(len(result.merged), '_orig/_mask pair')} into plain tensors" if result.merged
                 else "nothing to merge: no _orig/_mask pairs")
    if result.masks:
        where = f"written to {result.masks_output}" if result.masks_output else "dropped"
        _print_field(console, "masks", f"{len(result.masks)} {where}")
    if result.nonbinary_masks:
        _print_field(console, "warning", f"{_plural(len(result.nonbinary_masks), 'mask')} with entries other than "
                     f"0 and 1 (first: {result.nonbinary_masks[0]}), merged as orig * mask",
                     SEVERITY_STYLES["warning"])
    change = result.output_bytes / result.input_bytes - 1 if result.input_bytes else 0.0
    direction = "smaller" if change < 0 else "larger"
    _print_field(
        console,
        "wrote",
        f"{result.output} ({format_bytes(result.output_bytes)}, {result.format}, {_plural(result.tensors, 'tensor')}, "
        f"{format_percent(abs(change))} {direction} than the input; verified)",
        "green",
    )
    if result.masks_output is not None and result.masks_bytes is not None:
        _print_field(console, "wrote", f"{result.masks_output} ({format_bytes(result.masks_bytes)}, masks)")


def render_check(result: CheckResult, console: Console, *, quiet: bool = False) -> None:
    """Print one status line per file, its kept findings, and a summary line."""
    for item in result.files:
        if item.error is not None:
            console.print(Text.assemble(("ERROR ", "bold red"), item.error), soft_wrap=True)
            continue
        if item.passed and quiet:
            continue
        status = Text("PASS ", style="bold green") if item.passed else Text("FAIL ", style="bold red")
        detail = f"  sparsity {format_percent(item.sparsity)}"
        if item.failures:
            detail += f", {_plural(len(item.failures), 'failing finding')}"
        console.print(Text.assemble(status, str(item.path), detail), soft_wrap=True)
        listed = item.findings if not quiet else item.failures
        if listed:
            console.print(_check_findings_table(listed, {id(finding) for finding in item.failures}))
    if quiet:
        return
    passed = sum(1 for item in result.files if item.passed)
    unreadable = sum(1 for item in result.files if item.error is not None)
    failed = len(result.files) - passed - unreadable
    summary = f"Checked {_plural(len(result.files), 'file')}: {passed} passed, {failed} failed"
    if unreadable:
        summary += f", {unreadable} not checked (bad input)"
    if result.config_path is not None:
        summary += f" (settings from {result.config_path})"
    console.print(Text(summary, style="bold"))


def _check_findings_table(findings: Sequence[Any], failing: set[int]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column(width=3, no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold", ratio=1)
    for code, group in _group_by_code(finding.to_dict() | {"_id": id(finding)} for finding in findings):
        fails = any(item["_id"] in failing for item in group)
        marker = Text("  ✗" if fails else "  •", style="bold red" if fails else "dim")
        severity = Text(group[0]["severity"], style=SEVERITY_STYLES.get(group[0]["severity"], ""))
        if len(group) > _GROUP_THRESHOLD:
            keys = ", ".join(item["key"] for item in group[:_GROUP_THRESHOLD])
            table.add_row(marker, code, severity,
                          Text(f"{FINDING_CODES.get(code, code)}: {len(group)} keys ({keys}, ...)"))
            continue
        for item in group:
            table.add_row(marker, code, severity, Text(f"{item['key']}: {item['message']}"))
    return table


def _escape_data(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(value: str) -> str:
    return _escape_data(value).replace(":", "%3A").replace(",", "%2C")


def format_github(result: CheckResult) -> str:
    """Return GitHub Actions workflow commands: ``::error`` per failing finding, ``::warning`` per kept warning.

    Info findings are left out. Each unreadable file gets one ``::error``.
    The last line is a plain summary.
    """
    lines = []
    for item in result.files:
        file_property = f"file={_escape_property(str(item.path))}"
        if item.error is not None:
            lines.append(f"::error {file_property},title=unreadable checkpoint::{_escape_data(item.error)}")
            continue
        failing = {id(finding) for finding in item.failures}
        for finding in item.findings:
            if id(finding) in failing:
                level = "error"
            elif finding.severity == "warning":
                level = "warning"
            else:
                continue
            title = _escape_property(f"{finding.code} {finding.key}")
            lines.append(f"::{level} {file_property},title={title}::{_escape_data(finding.message)}")
    passed = sum(1 for item in result.files if item.passed)
    lines.append(f"prunedoctor check: {passed} of {len(result.files)} files passed")
    return "\n".join(lines) + "\n"
