"""``diag bench rank``: time open-world ranking on synthetic vectors of a real model's size.

Writes, tensor by tensor (never a whole vector in memory), a synthetic θ_base, a target model
θ_base + δ, ``n_sources`` sources (``ft.safetensors`` + ``star.safetensors``) and a Hessian card
with ``k`` eigenpairs into a content-keyed cache folder (:func:`cached_inputs`: written once, reused
by later runs with the same arguments); then runs :func:`diag.openworld.rank_folder` in a fresh
child process and reports its peak resident memory (the child's own ``VmHWM``, so writing the
inputs does not count: ``ru_maxrss`` would not do, since Linux carries the parent's high-water
mark across fork and exec) and these times (also in the output's ``"what"``):

* ``seconds`` — :func:`~diag.openworld.rank_folder` inside the child (reading and ranking only),
  wall clock; ``cpu_seconds`` — the CPU time of the child's threads over the same span, which
  other jobs on a shared machine do not inflate as much;
* ``import_seconds`` — the child's imports (torch, pandas, the ranking modules), from before
  ``import torch`` to the start of the ranking (the interpreter's own start is not in it);
* ``process_seconds`` — end to end, measured by the parent: interpreter start, imports, ranking
  and exit of the child, what a user waits for;
* ``inputs_written_seconds`` — writing the inputs this run (0 when cached); in none of the above.

Default size: the ViT-B/32 vision tower. The inputs are read from the page cache when it holds
them (a second run); otherwise ``seconds`` includes reading them from disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.perf_counter()  # before torch: the child's "import_seconds" include it

import torch

from diag.curvature.card import CARD_FORMAT
from diag.features.mapped import skip_exit_collection
from diag.openworld import rank_folder, RankInputs
from train.backbones import build_clip, load_config

BENCH_BASE_HASH = "benchbase0000000"
_CODES = {torch.float32: "F32", torch.float64: "F64"}


def vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the ViT-B/32 vision tower (built on the meta device: no memory)."""
    with torch.device("meta"):
        clip = build_clip(load_config("ViT-B-32"))
    return {f"visual.{k}": tuple(v.shape) for k, v in clip.visual.state_dict().items()}


def synthetic_shapes(n_params: int, width: int = 768) -> dict[str, tuple[int, ...]]:
    """Transformer-block-like matrices (``width`` columns) totalling ``n_params`` parameters."""
    rows_total = max(1, n_params // width)
    per_block = max(1, min(rows_total, 3072))
    shapes, i = {}, 0
    while rows_total > 0:
        r = min(per_block, rows_total)
        shapes[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] = (r, width)
        rows_total -= r
        i += 1
    return shapes


def write_streamed(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], object]],
                   metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors are produced chunk by chunk: ``entries`` = (name, dtype, shape, chunks())."""
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for _, dtype, _, chunks in entries:
            for chunk in chunks():
                fh.write(chunk.to(dtype).contiguous().numpy().tobytes())


def _randn(shape, seed: int, scale: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def write_inputs(folder: Path, shapes: dict[str, tuple[int, ...]], n_sources: int, k: int) -> dict[str, Path]:
    """θ_base, target, sources and (k ≥ 1) a card in ``folder``; returns their paths."""
    names = list(shapes)
    meta = {"base_hash": BENCH_BASE_HASH}

    def tensors(fn):
        return [(n, torch.float32, shapes[n], (lambda n=n, i=i: [fn(n, i)])) for i, n in enumerate(names)]

    write_streamed(folder / "base.safetensors", tensors(lambda n, i: _randn(shapes[n], i, 0.02)), meta)
    write_streamed(folder / "target.safetensors",
                   tensors(lambda n, i: _randn(shapes[n], i, 0.02) + _randn(shapes[n], 10_000 + i, 1e-3)), meta)
    for s in range(n_sources):
        sub = folder / "sources" / f"s{s}"
        sub.mkdir(parents=True)
        for kind, off in (("ft", 1), ("star", 2)):
            write_streamed(sub / f"{kind}.safetensors",
                           tensors(lambda n, i, s=s, off=off: _randn(shapes[n], 100_000 * (s + 1) + 10 * i + off, 1e-3)),
                           {**meta, "kind": "task_vector"})
    out = {"base": folder / "base.safetensors", "target": folder / "target.safetensors", "sources": folder / "sources"}
    if k >= 1:
        D = sum(math.prod(s) for s in shapes.values())
        card_meta = {"format": CARD_FORMAT, "param_names": json.dumps(names),
                     "param_shapes": json.dumps([list(shapes[n]) for n in names]), "trace": "null",
                     "trace_stderr": "null", "provenance": json.dumps({"base_hash": BENCH_BASE_HASH})}
        rows = [(n, math.prod(shapes[n]), i) for i, n in enumerate(names)]
        entries = [("eigvals", torch.float64, (k,), lambda: [torch.linspace(10.0, 1.0, k)]),
                   ("eigvecs", torch.float64, (D, k),
                    lambda: (_randn((m, k), 7 * i, 1 / math.sqrt(D)) for _, m, i in rows)),
                   ("residual_diag", torch.float64, (D,), lambda: (_randn((m,), 7 * i + 1, 1e-3).abs() for _, m, i in rows))]
        write_streamed(folder / "card.safetensors", entries, card_meta)
        out["card"] = folder / "card.safetensors"
    return out


def _peak_rss_kb() -> int:
    """This process image's peak resident set in KiB (``VmHWM``; ``ru_maxrss`` off Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(folder: str) -> None:
    """Rank the bench folder once; print seconds and this process's peak RSS as JSON."""
    imported = time.perf_counter()
    folder = Path(folder)
    card = folder / "card.safetensors"
    inputs = RankInputs(folder / "base.safetensors", folder / "target.safetensors", folder / "sources",
                        card if card.is_file() else None)
    start, cpu = time.perf_counter(), time.process_time()
    ranking, _ = rank_folder(inputs, target="bench")
    skip_exit_collection()  # as `diag rank-sources` does
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak_kb = _peak_rss_kb()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "import_seconds": imported - _T0,
                      "peak_rss_gb": peak_kb / 2 ** 20, "n_ranked": len(ranking.rows)}))


WHAT = {"seconds": "rank_folder in the child, wall clock (reading the inputs and ranking)",
        "cpu_seconds": "CPU time of the child's threads during rank_folder",
        "import_seconds": "the child's imports (torch, pandas, ranking modules), before the ranking",
        "process_seconds": "the child end to end as the parent waits: interpreter, imports, ranking, exit",
        "inputs_written_seconds": "writing the synthetic inputs this run (0 when cached); in none of the others",
        "peak_rss_gb": "the child's peak resident set (VmHWM), GiB"}
INPUTS_VERSION = 1  # bump when write_inputs changes what it writes: the cache key changes with it


def cache_root() -> Path:
    """Where bench inputs are kept between runs: ``$TVDIAG_BENCH_CACHE``, else ``<tmp>/tvdiag-bench-rank``."""
    return Path(os.environ.get("TVDIAG_BENCH_CACHE") or Path(tempfile.gettempdir()) / "tvdiag-bench-rank")


def cached_inputs(shapes: dict[str, tuple[int, ...]], n_sources: int, k: int, root: Path | None = None) -> Path:
    """The folder of :func:`write_inputs` for these arguments, written once and reused after.

    The inputs are a deterministic function of (shapes, n_sources, k, :data:`INPUTS_VERSION`), so the
    folder is named by the sha256 of those: a later run with the same arguments ranks the same bytes
    without writing 8 GB again. Written into a temporary sibling and renamed, so an interrupted write
    is never reused.
    """
    key = json.dumps({"v": INPUTS_VERSION, "shapes": sorted((n, list(s)) for n, s in shapes.items()),
                      "n_sources": n_sources, "k": k}, separators=(",", ":"))
    root = cache_root() if root is None else Path(root)
    folder = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (folder / "inputs.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=root))
    try:
        write_inputs(tmp, shapes, n_sources, k)
        (tmp / "inputs.json").write_text(key)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "inputs.json").is_file():  # not another run's finished copy: a real failure
            raise
    return folder


def bench_rank(n_params: int | None = None, n_sources: int = 8, k: int = 2, cache: Path | None = None) -> dict:
    """Rank cached synthetic inputs (:func:`cached_inputs`) in a child process.

    Args:
        cache: the cache root (default :func:`cache_root`).

    Returns:
        ``{"n_params", "n_sources", "k", "seconds", "cpu_seconds", "import_seconds", "process_seconds",
        "peak_rss_gb", "torch_threads", "inputs", "inputs_written_seconds", "what"}`` (module docstring;
        ``"what"`` says what each time is).
    """
    shapes = vit_b32_shapes() if n_params is None else synthetic_shapes(n_params)
    t0 = time.perf_counter()
    folder = cached_inputs(shapes, n_sources, k, cache)
    written = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diag.bench.ranking", str(folder)], capture_output=True, text=True,
                          env=env, check=False)
    process_seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"n_params": sum(math.prod(s) for s in shapes.values()), "n_sources": n_sources, "k": k,
            "seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"], "import_seconds": res["import_seconds"],
            "process_seconds": process_seconds, "peak_rss_gb": res["peak_rss_gb"],
            "torch_threads": torch.get_num_threads(), "inputs": str(folder), "inputs_written_seconds": written,
            "what": WHAT}


if __name__ == "__main__":
    child(sys.argv[1])
