"""Benchmark: offline `wise-ft merge` of two ~1 GB, 4-shard float32 Llama checkpoints.

The bench writes both checkpoints itself (random weights, real Llama names and shapes, a real
config and index) into a temporary folder and deletes them at the end. Side by side:
  * merge        `merge_checkpoints` in a child process: the merge's own time, the whole
                 process's wall time (with imports), and its peak RSS
  * interpreter  the same child importing the merge code and doing nothing: its peak RSS
  * I/O floor    reading both inputs and writing (and fsyncing) one output of the same size
  * mergekit     only with --mergekit: mergekit-yaml's linear merge of the same pair, from its
                 own venv, timed the same way
Goals (issue 2): merge within 2x of the I/O floor; peak RSS under 2x the largest shard plus the
interpreter; with --mergekit also at most half of mergekit's time and memory. Only what ran in
this invocation is compared: "compared_with" says "io_floor" or "io_floor+mergekit", and the
mergekit goals appear only when mergekit ran. Prints one JSON object last.

    .venv/bin/python bench/merge.py [--mergekit /tmp/mk/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

CHUNK = 64 * 2**20
MERGE = """
import json, sys, time
start = time.perf_counter()
from wise_callback.merge import merge_checkpoints
imported = time.perf_counter()
if sys.argv[1:]:
    early, latest, out = sys.argv[1:]
    merge_checkpoints(early, latest, out, 0.5, progress=False)
print(json.dumps({"import_s": imported - start, "merge_s": time.perf_counter() - imported}))
"""
LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True, check=True)
print(done.stdout)
print(json.dumps({"wall_s": time.perf_counter() - start,
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""
"""Runs a command and reports its wall time and peak RSS. A child's ru_maxrss includes the pages
of the process that spawned it, so the spawner is this tiny interpreter, not the bench."""
MERGEKIT_CONFIG = """merge_method: linear
dtype: float32
models:
  - model: {early}
    parameters: {{weight: 0.5}}
  - model: {latest}
    parameters: {{weight: 0.5}}
"""


def write_checkpoint(folder: Path, config: LlamaConfig, shards: int, seed: int) -> list[int]:
    """A sharded HF folder with random float32 weights; returns the shard sizes in bytes."""
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    names = list(shapes)
    total = sum(s.numel() * 4 for s in shapes.values())
    groups: list[list[str]] = [[]]
    filled = 0
    for name in names:
        if filled >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        filled += shapes[name].numel() * 4
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for i, group in enumerate(groups, start=1):
        file_name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: torch.randn(shapes[n], generator=generator) for n in group}, folder / file_name
        )
        weight_map.update(dict.fromkeys(group, file_name))
        sizes.append((folder / file_name).stat().st_size)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sizes


def io_floor(early: Path, latest: Path, out: Path) -> float:
    """Seconds to read every byte of both inputs and write (and fsync) one output as large."""
    buffer, other = bytearray(CHUNK), bytearray(CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    out.mkdir()
    for path in sorted(latest.glob("*.safetensors")):
        with (
            open(early / path.name, "rb") as e,
            open(path, "rb") as f,
            open(out / path.name, "wb") as o,
        ):
            while n := f.readinto(buffer):
                e.readinto(other)
                o.write(view[:n])
            o.flush()
            os.fsync(o.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def measured(*command: str) -> dict:
    """Wall time and peak RSS of `command`, plus the JSON its last stdout line holds, if any."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command], check=True, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return {**(json.loads(lines[-2]) if len(lines) > 1 else {}), **json.loads(lines[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (temp)")
    parser.add_argument(
        "--mergekit",
        default=None,
        metavar="MERGEKIT_YAML",
        help="also time this mergekit-yaml executable (from its own venv) on the same pair",
    )
    args = parser.parse_args()
    if args.mergekit is not None:
        found = shutil.which(args.mergekit)
        if found is None:
            parser.error(f"--mergekit {args.mergekit!r} is not an executable file")
        args.mergekit = found
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    python = sys.executable
    root = Path(tempfile.mkdtemp(prefix="wise-bench-merge-", dir=args.dir))
    runs: dict[str, list[dict]] = {"merge": [], "mergekit": []}
    floors = []
    try:
        early, latest, out = root / "early", root / "latest", root / "out"
        write_checkpoint(early, config, args.shards, seed=0)
        shard_sizes = write_checkpoint(latest, config, args.shards, seed=1)
        interpreter = measured(python, "-c", MERGE)
        (root / "mergekit.yml").write_text(MERGEKIT_CONFIG.format(early=early, latest=latest))
        for _ in range(args.repeats):
            floors.append(io_floor(early, latest, out))
            runs["merge"].append(measured(python, "-c", MERGE, str(early), str(latest), str(out)))
            shutil.rmtree(out)
            if args.mergekit:
                command = [args.mergekit, str(root / "mergekit.yml"), str(out), "--quiet"]
                command.append("--no-copy-tokenizer")  # the bench writes no tokenizer
                runs["mergekit"].append(measured(*command))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    floor = min(floors)
    merge = min(r["merge_s"] for r in runs["merge"])
    wall = min(r["wall_s"] for r in runs["merge"])
    rss = max(r["maxrss"] for r in runs["merge"])
    rss_limit = 2 * max(shard_sizes) + interpreter["maxrss"]
    goals = {
        "merge<=2x_io_floor": merge <= 2 * floor,
        "rss<2x_shard+interpreter": rss < rss_limit,
    }
    result = {
        "bench": "merge",
        "compared_with": "io_floor+mergekit" if runs["mergekit"] else "io_floor",
        "checkpoint_bytes": sum(shard_sizes),
        "shards": len(shard_sizes),
        "largest_shard_bytes": max(shard_sizes),
        "seconds": {
            "merge": round(merge, 3),
            "merge_process": round(wall, 3),
            "io_floor": round(floor, 3),
        },
        "merge_over_io_floor": round(merge / floor, 3),
        "merge_process_over_io_floor": round(wall / floor, 3),
        "peak_rss_bytes": rss,
        "interpreter_rss_bytes": interpreter["maxrss"],
        "peak_rss_over_limit": round(rss / rss_limit, 3),
    }
    if runs["mergekit"]:
        kit_wall = min(r["wall_s"] for r in runs["mergekit"])
        kit_rss = max(r["maxrss"] for r in runs["mergekit"])
        result["mergekit"] = {
            "executable": args.mergekit,
            "seconds": round(kit_wall, 3),
            "peak_rss_bytes": kit_rss,
        }
        result["merge_process_over_mergekit"] = round(wall / kit_wall, 3)
        result["peak_rss_over_mergekit"] = round(rss / kit_rss, 3)
        goals["time<=half_mergekit"] = wall <= kit_wall / 2
        goals["memory<=half_mergekit"] = rss <= kit_rss / 2
    result["goals_met"] = goals
    print(json.dumps(result))


if __name__ == "__main__":
    main()
