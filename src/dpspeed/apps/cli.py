"""The `dpspeed` command line."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from rich.console import Console

from .options import TrainConfig, parse_style

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GiB', '500MB' or a number of bytes."""
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].lower()
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; write e.g. 2GiB or 500MB")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; write e.g. 2GiB or 500MB") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpspeed")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _train_parser(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.description = ("Train under DP-SGD. With no options: a small CNN on scikit-learn's digits, ε = 8.")
    p.add_argument("--model", default=d.model, help="small_cnn, mlp, timm:NAME (random weights), or your own py:FILE.py:FUNCTION")
    p.add_argument("--data", default=d.data, choices=["digits", "cifar10", "cifar100"])
    p.add_argument("--data-dir", default=None, help="folder of the CIFAR python pickles (no download)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="expected logical batch size")
    p.add_argument("--physical-batch-size", type=int, default=None, help="largest physical batch (virtual batching)")
    p.add_argument("--lr", type=float, default=d.lr)
    privacy = p.add_mutually_exclusive_group()
    privacy.add_argument("--epsilon", type=float, default=None, help=f"target ε (default {d.epsilon})")
    privacy.add_argument("--sigma", type=float, default=None, help="noise multiplier instead of a target ε")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clipping threshold R")
    p.add_argument("--clipping-mode", default=d.clipping_mode)
    p.add_argument("--clipping-style", default=d.clipping_style, help="all-layer, layer-wise, param-wise or a number of groups")
    p.add_argument("--clipping-fn", default=d.clipping_fn, choices=["abadi", "automatic"])
    p.add_argument("--accountant", default=d.accountant, choices=["pld", "rdp"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the model's initialisation and the data split")
    p.add_argument("--reproducible", action="store_true",
                   help="seed the batches and the noise with --seed too: anyone who knows it can regenerate them")
    p.add_argument("--out", default=None, help="folder for metrics.json and checkpoint.pt (written after every epoch)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR to the epochs it was started with (its options; other options "
                        "are ignored)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _bench_parser(p: argparse.ArgumentParser) -> None:
    from ..bench.setups import PRECISIONS
    from ..bench.study import BenchConfig

    d = BenchConfig()
    p.description = ("Measure throughput, largest physical batch, time breakdown and memory of "
        "non-private training and every clipping mode; write results.json, plots and report.md. "
        "With no options: a small CNN on the GPU if there is one, else the CPU, in a few minutes.")
    p.add_argument("--model", "--models", dest="models", nargs="+", default=d.models,
                   help="small_cnn, mlp, timm:NAME or hf:MODEL_TYPE (random weights), your own py:FILE.py:FUNCTION; several give the curve over sizes")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence for hf: models")
    p.add_argument("--device", default=d.device)
    p.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS,
                   help="default: fp32 tf32 bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--modes", nargs="+", default=d.modes)
    p.add_argument("--peers", nargs="*", default=[], choices=["opacus", "jax"],
                   help="peers timed in the same run: Opacus, and DP-SGD in JAX (jax-privacy) on a Flax twin of a timm ViT")
    p.add_argument("--max-batch", type=int, default=None, help="upper limit of the batch search (default 64 on CPU, 4096 on GPU)")
    p.add_argument("--min-batch", type=int, default=d.min_batch, help="smallest batch of the throughput curve")
    p.add_argument("--memory-limit", type=parse_bytes, default=None, help="treat steps needing more as out of memory (e.g. 2GiB)")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--memory-mode", default=d.memory_mode, help="clipping mode of the memory profile")
    p.add_argument("--memory-styles", nargs="+", type=parse_style, default=d.memory_styles,
                   help="clipping styles of the memory profile (a number is uniform groups)")
    p.add_argument("--memory-batch", type=int, default=None, help="batch of the memory profile (default: the largest that fits, up to --max-batch)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="folder for results.json, plots and report.md")
    p.add_argument("--compile", action="store_true",
                   help="forward passes through torch.compile (compare with an eager run: dpspeed report A B)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out: measure only the setups it has not completed")
    p.add_argument("--scaling", action="store_true", help="under torchrun: throughput on 1..N processes and Amdahl's law")
    p.add_argument("--scaling-batch", type=int, default=d.scaling_batch, help="--scaling: physical batch per process")
    p.add_argument("--accumulate", type=int, default=d.accumulate, help="--scaling: physical batches per logical batch")
    p.add_argument("--bandwidth", type=float, default=d.bandwidth,
                   help="--scaling: interconnect bytes/s per link for the modelled efficiency at 8, 32, 80 processes")
    p.add_argument("--no-progress", action="store_true")


def _audit_parser(p: argparse.ArgumentParser) -> None:
    from ..audit import AuditConfig

    d = AuditConfig()
    p.description = ("Insert canaries, each with probability 1/2, train once, guess which were in, and "
        "turn the guesses into a lower bound on epsilon (Steinke, Nasr & Jagielski 2023), beside the "
        "claimed epsilon. With no options: a linear classifier on digits, epsilon = 1, in seconds.")
    p.add_argument("--canaries", type=int, default=d.canaries)
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="the claimed epsilon the noise is calibrated to")
    p.add_argument("--delta", type=float, default=d.delta)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--clipping-mode", default=d.clipping_mode)
    p.add_argument("--guesses", type=int, default=None, help="in and out guesses together (default: a fifth of the canaries)")
    p.add_argument("--confidence", type=float, default=d.confidence)
    p.add_argument("--out", default="runs/audit", help="folder for audit.json")


def _epsilon_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("epsilon after STEPS Poisson-sampled Gaussian steps (--sigma), or the smallest noise "
        "multiplier reaching --target-epsilon. The rate is --sample-rate, or --batch-size / "
        "--examples; the steps are --steps, or --epochs x ceil(1 / rate) as make_private "
        "counts them.")
    privacy = p.add_mutually_exclusive_group(required=True)
    privacy.add_argument("--sigma", type=float, help="noise multiplier: print epsilon")
    privacy.add_argument("--target-epsilon", type=float, help="print the noise multiplier that reaches it")
    p.add_argument("--sample-rate", type=float, help="q, the probability of each example being in a batch")
    p.add_argument("--batch-size", type=int, help="expected logical batch size (with --examples)")
    p.add_argument("--examples", type=int, help="training examples N (with --batch-size)")
    p.add_argument("--steps", type=int, help="logical batches")
    p.add_argument("--epochs", type=float, help="epochs, instead of --steps")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="pld", choices=["pld", "rdp"])


def _epsilon(args: argparse.Namespace, console: Console) -> int:
    from ..accounting import epsilon_at, noise_for_epsilon

    if args.sample_rate is None and (args.batch_size is None or args.examples is None):
        raise ValueError("give --sample-rate, or --batch-size and --examples")
    if args.sample_rate is None and not 0 < args.batch_size <= args.examples:
        raise ValueError(f"--batch-size must be in [1, --examples], got {args.batch_size} of {args.examples}")
    rate = args.sample_rate if args.sample_rate is not None else args.batch_size / args.examples
    if not 0 < rate <= 1:
        raise ValueError(f"the sample rate must be in (0, 1], got {rate:g}")
    if (args.steps is None) == (args.epochs is None):
        raise ValueError("give --steps or --epochs (one of them)")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs:g}")
    if args.sigma is not None and args.sigma <= 0:
        raise ValueError(f"--sigma must be positive, got {args.sigma:g}")
    # as make_private counts them: ceil(N / batch_size) logical batches per epoch (ceil(1 / q) from a rate)
    per_epoch = -(-args.examples // args.batch_size) if args.sample_rate is None else math.ceil(1 / rate)
    steps = args.steps if args.steps is not None else max(1, round(args.epochs * per_epoch))
    if steps < 1 or not 0 < args.delta < 1:
        raise ValueError("--steps must be at least 1 and --delta in (0, 1)")
    where = f"q = {rate:.4g}, {steps} steps, δ = {args.delta:g}, {args.accountant.upper()}"
    if args.sigma is not None:
        console.print(f"ε = [bold]{epsilon_at(args.accountant, args.sigma, rate, steps, args.delta):.4g}[/bold] "
                      f"(σ = {args.sigma:g}, {where})")
    else:
        sigma = noise_for_epsilon(args.target_epsilon, args.delta, rate, steps, args.accountant)
        console.print(f"σ = [bold]{sigma:.4g}[/bold] reaches ε = {args.target_epsilon:g} ({where})")
    return 0


def _audit(args: argparse.Namespace, console: Console) -> int:
    from ..audit import AuditConfig, run_audit

    options = {k: v for k, v in vars(args).items() if k in AuditConfig.__dataclass_fields__}
    result = run_audit(AuditConfig(**options))
    verdict = "[red]contradicts the claim[/red]" if result.contradicts_claim else "consistent with the claim"
    console.print(f"epsilon lower bound [bold]{result.epsilon_lower_bound:.3f}[/bold] at {result.confidence:.0%} "
                  f"confidence ({result.correct} of {result.guesses} guesses right, {result.canaries} canaries), "
                  f"claimed epsilon {result.epsilon_claimed:g} (delta {result.delta:g}): {verdict}; "
                  f"{args.out}/audit.json")
    return 1 if result.contradicts_claim else 0


def _report_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("dpspeed report DIR rebuilds DIR/report.md and its plots; dpspeed report A B "
        "writes a comparison of two result folders (two GPUs, two versions).")
    p.add_argument("folders", nargs="+", help="one or two folders holding results.json")
    p.add_argument("--out", default=None, help="where to write (default: the first folder)")


def _bench(args: argparse.Namespace, console: Console) -> int:
    from ..bench.report import build
    from ..bench.study import BenchConfig, Study

    gpu = args.device.startswith("cuda")
    options = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__ and v is not None}
    options.setdefault("precisions", ["fp32", "tf32", "bf16"] if gpu else ["fp32"])
    options.setdefault("max_batch", 4096 if gpu else 64)
    config = BenchConfig(**options)
    if args.scaling:
        from ..bench.scaling import run_scaling

        results = run_scaling(config)
        if results is None:  # not rank 0
            return 0
    else:
        results = Study(config, show_progress=not args.no_progress).run()
    report = build(results, Path(config.out))
    console.print(f"results, plots and report in [bold]{config.out}[/bold] ({report.name})")
    for choice in results.get("recommendation", []):
        console.print(f"recommended for {choice['model']}: mode {choice['mode']}, {choice['precision']}, "
                      f"batch {choice['batch']}: {choice['per_second']:.1f}/s"
                      + (f", {choice['relative_to_non_private']:.2f}× non-private" if choice["relative_to_non_private"] else ""))
    return 130 if results.get("interrupted") else 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from ..bench.report import build, compare, load

    if len(args.folders) > 2:
        raise ValueError("give one folder to rebuild its report, or two to compare them")
    loaded = [load(f) for f in args.folders]
    out = Path(args.out or args.folders[0])
    path = build(loaded[0], out) if len(loaded) == 1 else compare(loaded[0], loaded[1], tuple(args.folders), out)
    console.print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from .train import train

    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if options["epsilon"] is None and options["sigma"] is None:
        options["epsilon"] = TrainConfig().epsilon
    result = train(TrainConfig(**options), show_progress=not args.no_progress)
    console.print(
        f"test accuracy [bold]{result.test_accuracy:.4f}[/bold] at ε = [bold]{result.epsilon:.2f}[/bold] "
        f"(δ = {result.delta:g}, σ = {result.noise_multiplier:.3f}, {result.steps} steps, {result.seconds:.0f} s)"
    )
    return 0


#: command -> (its one-line help, the builder of its arguments, what runs it)
COMMANDS = {
    "train": ("train a model under differential privacy", _train_parser, _train),
    "bench": ("measure what DP costs on this model and device", _bench_parser, _bench),
    "report": ("rebuild report.md and plots from results.json, or compare two result folders", _report_parser,
               _report),
    "audit": ("an empirical lower bound on epsilon from one training run", _audit_parser, _audit),
    "epsilon": ("epsilon of a DP-SGD run, or the noise multiplier for a target epsilon", _epsilon_parser, _epsilon),
}


def main(argv: list[str] | None = None) -> int:
    """The command line. Only the chosen command's arguments are built (and its modules imported),
    so that `dpspeed --help` answers at once. A mistake is one line on stderr and exit code 2;
    `-v` shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="dpspeed", description="Differentially private training at non-private speed")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what dpspeed does; tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"dpspeed {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, build, _) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary)
        if name == chosen:
            build(command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=False)
    try:
        return COMMANDS[args.command][2](args, console)
    except Exception as err:  # noqa: BLE001 -- a mistake of the user's is one line, not a traceback
        if args.verbose:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {message} [dim](-v: the traceback)[/dim]",
                                                    highlight=False)
        return 2

if __name__ == "__main__":
    sys.exit(main())
