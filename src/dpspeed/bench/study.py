"""The benchmark run: for every model, precision and setup, the largest physical batch, throughput
over physical batch sizes, the time breakdown and an end-to-end figure; then the memory profile per
clipping style. Results are written after every setup, so an interrupted run keeps what it measured."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..clipping.methods import ALL_MODES, TWO_PASS_MODES
from . import jax_peer, resume
from .memory import fact_6_1, layer_sizes, peak_bytes
from .results import doubts, recommend
from .search import free_memory, largest_batch
from .setups import NON_PRIVATE, Setup
from .timing import breakdown, end_to_end, throughput
from .workload import Workload

logger = logging.getLogger(__name__)
DEFAULT_MODES = [m for m in ALL_MODES if m != "auto"] + ["auto"]


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["small_cnn"])
    image_size: int = 32
    num_classes: int = 10
    seq_len: int = 128
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    peers: list[str] = field(default_factory=list)
    max_batch: int = 64
    min_batch: int = 4
    memory_limit: int | None = None  # bytes; a step above it counts as out of memory
    repeats: int = 5
    warmup: int = 2
    memory_mode: str = "auto"
    memory_styles: list = field(default_factory=lambda: ["all-layer", "layer-wise", 4])
    memory_batch: int | None = None
    seed: int = 0
    out: str = "bench-results"
    scaling_batch: int = 32  # --scaling: physical batch per process
    accumulate: int = 1  # --scaling: physical batches per logical batch (one all-reduce each)
    bandwidth: float = 25e9  # --scaling: bytes/s per link for the model at 8, 32 and 80 processes
    resume: bool = False  # continue the run saved in `out`: measure only what it has not (resume.py)
    compile: bool = False  # forward passes through torch.compile (warm-up includes the compilation)


def source_commit() -> str | None:
    """The git commit of dpspeed's source tree ("+dirty" when it has uncommitted changes), or None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").exists():  # an installed copy, not the checkout
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "dpspeed": __version__}
    for package in ("timm", "transformers", "opacus"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "versions": versions, "commit": source_commit(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_result(out: Path, device: torch.device, args: object, results: object) -> None:
    """A benchmark script's JSON: the environment (device, versions, commit), its arguments, its
    results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out.write_text(json.dumps({"environment": environment(device), "args": arguments, "results": results}, indent=1))


class OverMemoryLimit(torch.OutOfMemoryError):
    """A step needed more than the --memory-limit given to the bench."""


class Study:
    def __init__(self, config: BenchConfig, show_progress: bool = True):
        self.config = config
        self.device = torch.device(config.device)
        self.out = Path(config.out)
        self.show_progress = show_progress
        self.results: dict = {
            "environment": environment(self.device), "config": asdict(config), "seed": config.seed,
            "models": {}, "largest_batch": [], "throughput": [], "breakdown": [], "end_to_end": [], "memory": [],
            "completed": [],
        }
        self._jax_missing = jax_peer.missing() if "jax" in config.peers else []
        if self._jax_missing:
            logger.warning("--peers jax: skipped, %s not installed (pip install \"dpspeed[jax]\")",
                           ", ".join(self._jax_missing))
        earlier = resume.load_earlier(self.out / "results.json", resume.config_as_saved(config)) \
            if config.resume else None
        if earlier is not None:
            resume.merge(self.results, earlier)
            logger.info("resuming %s: %d parts measured already", self.out / "results.json", len(earlier["completed"]))

    def save(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["recommendation"] = [r for m in self.results["models"] if (r := recommend(self.results, m))]
        path = self.out / "results.json"
        path.write_text(json.dumps(self.results, indent=1, default=str))
        return path

    def setups(self) -> list[str]:
        peers = [f"opacus-{m}" for m in ("hooks", "ghost") if "opacus" in self.config.peers]
        if "jax" in self.config.peers and not self._jax_missing:
            peers += jax_peer.LABELS
        return [NON_PRIVATE, *self.config.modes, *peers]

    def run(self) -> dict:
        """Measure everything; on Ctrl-C keep what was measured (results['interrupted'] = True)."""
        c = self.config
        total = len([p for model in c.models for p in self._parts(model) if p not in self.results["completed"]])
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, disable=not self.show_progress) as progress:
            task = progress.add_task("bench", total=total)
            try:
                for model in c.models:
                    self._model(model, progress, task)
            except KeyboardInterrupt:
                self.results["interrupted"] = True
                logger.warning("interrupted: keeping what was measured")
        self.save()
        return self.results

    def _workload(self, model: str) -> Workload:
        c = self.config
        return Workload(model, c.image_size, 3, c.num_classes, c.seq_len, c.seed)

    def _parts(self, model: str) -> list[str]:
        """The units of work for `model`, in the order they run (resume.part)."""
        return [*[resume.part(model, precision, label) for precision in self.config.precisions
                  for label in self.setups()], resume.part(model)]

    def _model(self, name: str, progress: Progress, task) -> None:
        """Every setup of `name` in every precision, then its memory profile; parts an earlier run
        completed are skipped, and each part is marked completed once measured in full."""
        if all(p in self.results["completed"] for p in self._parts(name)):
            return
        workload = self._workload(name)
        base = workload.build(self.device)
        self.results["models"][name] = {"unit": workload.unit, "parameters": sum(p.numel() for p in base.parameters())}
        for precision in self.config.precisions:
            for label in self.setups():
                if resume.part(name, precision, label) in self.results["completed"]:
                    continue
                progress.update(task, description=f"{name} {precision} {label}")
                self._setup(workload, base, label, precision)
                self._completed(resume.part(name, precision, label), progress, task)
        if resume.part(name) not in self.results["completed"]:
            progress.update(task, description=f"{name} memory per clipping style")
            self._memory(workload, base)
            self._completed(resume.part(name), progress, task)

    def _completed(self, part: str, progress: Progress, task) -> None:
        self.results["completed"].append(part)
        self.save()
        progress.advance(task)

    def _step_within_limit(self, setup: Setup, workload: Workload, precision: str, batch: int) -> None:
        x, y = workload.batch(batch, self.device)

        def two_steps() -> None:
            setup.step(x, y, precision)
            setup.step(x, y, precision, last=True)

        if self.config.memory_limit is None:
            two_steps()
            return
        peak = peak_bytes(two_steps, self.device)
        if peak > self.config.memory_limit:
            raise OverMemoryLimit(f"batch {batch} needs {peak} bytes, over the limit of {self.config.memory_limit}")

    def _setup(self, workload: Workload, base: torch.nn.Module, label: str, precision: str) -> None:
        c = self.config
        key = {"model": workload.model, "precision": precision, "setup": label}
        if label in jax_peer.LABELS:
            self._jax(workload, base, key)
            return
        if label in TWO_PASS_MODES and precision == "bf16":  # refused: their sums round to 16 bits
            self.results["largest_batch"].append({**key, "largest": 0, "at_limit": False,
                                                  "error": "the two-pass modes refuse 16-bit autocast"})
            return
        try:
            setup = Setup(base, label, compiled=c.compile)
        except (ValueError, RuntimeError, ImportError) as err:
            logger.warning("%s cannot run %s: %s", label, workload.model, err)
            self.results["largest_batch"].append({**key, "largest": 0, "at_limit": False, "error": str(err)})
            return
        try:
            search = largest_batch(lambda b: self._step_within_limit(setup, workload, precision, b),
                                   limit=c.max_batch, start=min(c.min_batch, c.max_batch), cleanup=setup.reset)
            self.results["largest_batch"].append({**key, "largest": search.largest, "at_limit": search.at_limit,
                                                  "tried": search.tried})
            if search.largest == 0:
                return
            sizes = sorted({b for b in _powers_of_two(c.min_batch, search.largest)} | {search.largest})
            for batch in sizes:
                x, y = workload.batch(batch, self.device)
                try:
                    row = self._trusted_throughput(setup, key, x, y)
                except torch.OutOfMemoryError:  # fitted in the search; fragmentation can still tip it over
                    logger.warning("%s ran out of memory at batch %d while timing; skipped", label, batch)
                    setup.reset()
                    free_memory()
                    continue
                self.results["throughput"].append({**key, **row})
            timed = [r for r in self.results["throughput"] if all(r[k] == v for k, v in key.items())]
            if not timed:
                return
            best = max([r for r in timed if not r.get("suspect")] or timed, key=lambda r: r["per_second"])
            x, y = workload.batch(best["batch"], self.device)
            try:
                self.results["breakdown"].append({**key, **breakdown(setup, x, y, precision, c.repeats)})
                self.results["end_to_end"].append(
                    {**key, **end_to_end(setup, workload, best["batch"], precision, c.repeats + 1, self.device)})
            except torch.OutOfMemoryError:  # instrumented steps and the data loader need a little more
                logger.warning("%s ran out of memory at batch %d in the breakdown or end-to-end run; skipped",
                               label, best["batch"])
                setup.reset()
                free_memory()
        finally:
            setup.close()

    def _jax(self, workload: Workload, base: torch.nn.Module, key: dict) -> None:
        """The JAX peer (jax_peer.py): its largest batch and its throughput over batch sizes, each
        with the seconds its step took to compile; skipped, with the reason, for a model it has no
        Flax twin of."""
        c = self.config
        config = jax_peer.vit_config(base)
        if isinstance(config, str):
            logger.warning("--peers jax: %s skipped: %s", workload.model, config)
            self.results["largest_batch"].append({**key, "largest": 0, "at_limit": False, "error": config})
            return
        steps = jax_peer.JaxSteps(config, key["setup"], key["precision"], seed=c.seed)

        def batch(size: int) -> tuple:
            return jax_peer.as_numpy(*workload.batch(size, "cpu"))

        search = largest_batch(lambda b: steps.step(*batch(b)), limit=c.max_batch, start=min(c.min_batch, c.max_batch))
        self.results["largest_batch"].append({**key, "largest": search.largest, "at_limit": search.at_limit,
                                              "tried": search.tried})
        for size in sorted({b for b in _powers_of_two(c.min_batch, search.largest)} | {search.largest} - {0}):
            row = jax_peer.throughput(steps, *batch(size), c.repeats, c.warmup)
            self.results["throughput"].append({**key, **row})

    def _trusted_throughput(self, setup: Setup, key: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        """A throughput row, measured once more if it cannot be right (`results.doubts`), and
        flagged `suspect` with the reasons if the second measurement cannot be trusted either."""
        c = self.config
        non_private = next((r for r in self.results["throughput"] if r["model"] == key["model"] and r["batch"] == len(x)
                            and r["precision"] == key["precision"] and r["setup"] == NON_PRIVATE), None)
        row = throughput(setup, x, y, key["precision"], c.repeats, c.warmup)
        if doubts(row, non_private if key["setup"] != NON_PRIVATE else None):
            row = throughput(setup, x, y, key["precision"], c.repeats, c.warmup)
            reasons = doubts(row, non_private if key["setup"] != NON_PRIVATE else None)
            if reasons:
                row["suspect"] = "; ".join(reasons)
                logger.warning("distrusted %s at batch %d: %s", key, len(x), row["suspect"])
        return row

    def _memory(self, workload: Workload, base: torch.nn.Module) -> None:
        """Peak memory of one step per clipping style next to Fact 6.1, at one batch size."""
        c = self.config
        fitted = [r["largest"] for r in self.results["largest_batch"]
                  if r["model"] == workload.model and r["setup"] in (NON_PRIVATE, c.memory_mode) and r["largest"]]
        batch = c.memory_batch or min([*fitted, c.max_batch])
        precision = c.precisions[0]
        x, y = workload.batch(batch, self.device)
        layers = layer_sizes(base, x)
        element = 2 if precision == "bf16" else 4
        for label, style in [(NON_PRIVATE, None), *[(c.memory_mode, s) for s in c.memory_styles]]:
            setup = None
            try:
                setup = Setup(base, label, style or "all-layer", compiled=c.compile)
                setup.step(x, y, precision, last=True)  # warm-up: optimizer state, first-pass trace
                measured = peak_bytes(lambda: setup.step(x, y, precision, last=True), self.device)
            except (torch.OutOfMemoryError, RuntimeError, ValueError) as err:
                logger.warning("memory profile of %s %s failed: %s", label, style, err)
                continue
            finally:
                if setup is not None:
                    setup.close()
            self.results["memory"].append({
                "model": workload.model, "precision": precision, "setup": label, "style": str(style or "non-private"),
                "batch": batch, "measured_bytes": measured,
                "fact_6_1_bytes": fact_6_1(layers, style, batch, element) if style is not None else None,
            })


def _powers_of_two(low: int, high: int) -> list[int]:
    sizes, b = [], 1
    while b <= high:
        if b >= low:
            sizes.append(b)
        b *= 2
    return sizes
