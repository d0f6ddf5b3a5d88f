"""The `dpspeed` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console

from .train import TrainConfig, train


def _train_parser(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a model under differential privacy",
                       description="Train under DP-SGD. With no options: a small CNN on scikit-learn's digits, ε = 8.")
    p.add_argument("--model", default=d.model, help="small_cnn, mlp, or timm:NAME (random weights)")
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
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=None, help="folder for metrics.json and checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpspeed", description="Differentially private training at non-private speed")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
        if options["epsilon"] is None and options["sigma"] is None:
            options["epsilon"] = TrainConfig().epsilon
        try:
            result = train(TrainConfig(**options), show_progress=not args.no_progress)
        except (ValueError, FileNotFoundError) as err:
            console.print(f"[red]error:[/red] {err}")
            return 2
        console.print(
            f"test accuracy [bold]{result.test_accuracy:.4f}[/bold] at ε = [bold]{result.epsilon:.2f}[/bold] "
            f"(δ = {result.delta:g}, σ = {result.noise_multiplier:.3f}, {result.steps} steps, {result.seconds:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
