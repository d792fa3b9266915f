"""Benchmark --help, inspect and normalize against plain-torch baselines on a ViT-Base-sized checkpoint.

Usage, from the repository root::

    python benchmarks/bench_foundation.py            # print the table
    python benchmarks/bench_foundation.py --write    # also update benchmarks/RESULTS.md

The script generates (once, cached in ``benchmarks/_work/``) a checkpoint of
timm's ``vit_base_patch16_224`` (86.6M parameters, random weights, no
download) with every block linear pruned by ``torch.nn.utils.prune`` and
saved with the reparametrization active: about 0.7 GB. Every measurement
runs in a fresh subprocess, alternating baseline and prunedoctor, and the
median of ``--repeats`` runs is reported. The file is read once beforehand,
so every run reads it from the page cache. Ratios, not absolute times, are
the result, because the machine is shared and noisy.

Baselines:
- inspect: a bare ``torch.load(path, weights_only=True)`` (no mmap).
- normalize: a naive script: ``torch.load`` + ``orig * mask`` for every pair
  into a new dict + ``torch.save``.

Peak memory is the child's ``ru_maxrss`` (resident set, including the
``import torch`` baseline, which is reported on its own line). Linux keeps
the peak of the process that forked a child, so the checkpoint is written
in a subprocess of its own and this script stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CHECKPOINT = WORK / "vit_base_reparam.pt"
START_MARK = "<!-- bench_foundation:start -->"
END_MARK = "<!-- bench_foundation:end -->"

# Each snippet runs in a fresh interpreter and prints one JSON line with the
# seconds spent in the measured call and the process's peak RSS in KiB.
_PRELUDE = """
import json, resource, sys, time
path, out = sys.argv[1], sys.argv[2]
"""
_REPORT = """
print(json.dumps({"seconds": elapsed, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
SNIPPETS = {
    "import torch": """
import torch
elapsed = 0.0
""",
    "bare torch.load": """
import torch
start = time.perf_counter()
state = torch.load(path, map_location="cpu", weights_only=True)
elapsed = time.perf_counter() - start
""",
    "inspect (library, all sections)": """
import torch
from prunedoctor.inspection import inspect_checkpoint
start = time.perf_counter()
report = inspect_checkpoint(path)
elapsed = time.perf_counter() - start
""",
    "inspect (library, core report)": """
import torch
from prunedoctor.inspection import analyze_checkpoint, build_report
from prunedoctor.loading import load_checkpoint
start = time.perf_counter()
checkpoint = load_checkpoint(path)
report = build_report(checkpoint, analysis=analyze_checkpoint(checkpoint), sections=[])
elapsed = time.perf_counter() - start
""",
    "naive normalize": """
import torch
start = time.perf_counter()
state = torch.load(path, map_location="cpu", weights_only=True)
merged = {}
for key, value in state.items():
    if key.endswith("_mask"):
        continue
    if key.endswith("_orig"):
        name = key[: -len("_orig")]
        merged[name] = value * state[name + "_mask"]
    else:
        merged[key] = value
torch.save(merged, out)
elapsed = time.perf_counter() - start
""",
    "prunedoctor normalize": """
import torch
from prunedoctor.normalize import normalize_checkpoint
start = time.perf_counter()
normalize_checkpoint(path, out, force=True)
elapsed = time.perf_counter() - start
""",
}


def make_checkpoint(path: Path) -> None:
    """Write the ViT-Base checkpoint with every block linear reparametrized (random 50 % masks)."""
    import torch
    import torch.nn.utils.prune as prune
    from timm import create_model

    torch.manual_seed(0)
    model = create_model("vit_base_patch16_224", pretrained=False)
    generator = torch.Generator().manual_seed(0)
    for block in model.blocks:
        for module in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            mask = (torch.rand(module.weight.shape, generator=generator) < 0.5).float()
            prune.custom_from_mask(module, "weight", mask)
    temp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temp)
    os.replace(temp, path)


def run_snippet(name: str, out: Path) -> dict[str, float]:
    code = _PRELUDE + textwrap.dedent(SNIPPETS[name]) + _REPORT
    result = subprocess.run(
        [sys.executable, "-c", code, str(CHECKPOINT), str(out)],
        capture_output=True, text=True, check=False, cwd=WORK,
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_help() -> float:
    script = Path(sys.executable).with_name("prunedoctor")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "prunedoctor"]
    start = time.perf_counter()
    subprocess.run([*command, "--help"], capture_output=True, check=True)
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, dict[str, float]]:
    outputs = {"naive normalize": WORK / "naive_out.pt", "prunedoctor normalize": WORK / "prunedoctor_out.pt"}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in SNIPPETS}
    for _ in range(repeats):
        for name in SNIPPETS:  # interleaved, so drift on a shared machine hits every variant alike
            samples[name].append(run_snippet(name, outputs.get(name, WORK / "unused.pt")))
    summary = {
        name: {
            "seconds": statistics.median(run["seconds"] for run in runs),
            "max_rss_mib": statistics.median(run["max_rss_kib"] for run in runs) / 1024,
        }
        for name, runs in samples.items()
    }
    summary["prunedoctor --help"] = {"seconds": statistics.median(time_help() for _ in range(repeats)),
                                     "max_rss_mib": float("nan")}
    return summary


def render(
    summary: dict[str, dict[str, float]], repeats: int, load_averages: tuple[tuple[float, ...], ...]
) -> str:
    """Return the RESULTS.md section; ``load_averages`` are ``os.getloadavg()`` before and after measuring."""

    def row(name: str) -> str:
        item = summary[name]
        rss = "–" if item["max_rss_mib"] != item["max_rss_mib"] else f"{item['max_rss_mib']:.0f}"
        return f"| {name} | {item['seconds']:.3f} | {rss} |"

    load = summary["bare torch.load"]
    naive = summary["naive normalize"]
    ours = summary["prunedoctor normalize"]
    torch_rss = summary["import torch"]["max_rss_mib"]
    size_gb = CHECKPOINT.stat().st_size / 1e9
    load_text = " and ".join(", ".join(f"{value:.2f}" for value in item) for item in load_averages)
    lines = [
        START_MARK,
        "## Foundation: `--help`, `inspect`, `normalize`",
        "",
        f"Command: `python benchmarks/bench_foundation.py --write --repeats {repeats}`.",
        f"Checkpoint: `vit_base_patch16_224`, every block linear reparametrized, {size_gb:.2f} GB, "
        "read from the page cache.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; median of {repeats} fresh processes per row.",
        "",
        "| measurement | seconds | peak RSS (MiB) |",
        "|---|---:|---:|",
        *(row(name) for name in summary),
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| `prunedoctor --help` under 0.5 s | {summary['prunedoctor --help']['seconds']:.3f} s | "
        f"{'yes' if summary['prunedoctor --help']['seconds'] < 0.5 else 'no'} |",
    ]
    for name in ("inspect (library, all sections)", "inspect (library, core report)"):
        ratio = summary[name]["seconds"] / load["seconds"]
        lines.append(f"| {name} at most 1.2x bare torch.load | {ratio:.2f}x | {'yes' if ratio <= 1.2 else 'no'} |")
    time_ratio = ours["seconds"] / naive["seconds"]
    rss_ratio = ours["max_rss_mib"] / naive["max_rss_mib"]
    naive_net = naive["max_rss_mib"] - torch_rss
    net_ratio = (ours["max_rss_mib"] - torch_rss) / naive_net if naive_net > 0 else float("nan")
    lines += [
        f"| normalize no slower than the naive script | {time_ratio:.2f}x | {'yes' if time_ratio <= 1.0 else 'no'} |",
        f"| normalize at most 0.8x the naive peak RSS | {rss_ratio:.2f}x | {'yes' if rss_ratio <= 0.8 else 'no'} |",
        f"| the same, above the `import torch` baseline | {net_ratio:.2f}x | "
        f"{'yes' if net_ratio <= 0.8 else 'no' if net_ratio == net_ratio else 'n/a'} |",
        "",
        "The inspect rows time the library call in-process: the loader, every measurement, the findings",
        "and the report. The import of torch is the same in both processes and left out. The two rows",
        "differ by the report sections: \"all sections\" adds the ViT structure section (`prunedoctor/vit/`)",
        "that `prunedoctor inspect` shows by default. That section reads the per-row and per-column nonzero",
        "flags that the measuring pass records, so it reads no tensor data again.",
        f"Load average (1, 5, 15 minutes) before and after the run: {load_text}.",
        END_MARK,
    ]
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    header = "# Benchmark results\n\nEach section is written by the script it names; rerun it to refresh.\n\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else header
    if START_MARK in text and END_MARK in text:
        before = text[: text.index(START_MARK)]
        after = text[text.index(END_MARK) + len(END_MARK) :].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    temp = RESULTS.with_suffix(".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark inspect and normalize against plain-torch baselines.")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (default 3)")
    parser.add_argument("--write", action="store_true", help="update the section in benchmarks/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the generated files in benchmarks/_work/")
    parser.add_argument(
        "--write-checkpoint", action="store_true", help="only write the checkpoint into benchmarks/_work/ and exit"
    )
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    if args.write_checkpoint:
        make_checkpoint(CHECKPOINT)
        return
    if not CHECKPOINT.exists():
        print(f"writing {CHECKPOINT} ...", file=sys.stderr)
        # In a subprocess: the children forked below would report this process's peak RSS otherwise.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--write-checkpoint"], check=True)
    with CHECKPOINT.open("rb") as handle:  # warm the page cache
        while handle.read(1 << 24):
            pass
    load_before = os.getloadavg()
    summary = measure(args.repeats)
    section = render(summary, args.repeats, (load_before, os.getloadavg()))
    print(section)
    if args.write:
        write_results(section)
    if not args.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    main()
