"""``rl-train --config configs/rl_default.toml [--section.key=value ...]``

Overrides are TorchTitan's (``--weight_sync.backend=dcp --training.steps=20``). A bad config is
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from checkpointing import ConfigError


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="rl-train",
        description="GRPO on a TorchTitan model; the trainer and the generator exchange weights through Checkpointers.",
        epilog="Any other --section.key=value is a TorchTitan-style config override.",
    )
    parser.add_argument("--config", "--job.config_file", dest="config", help="TorchTitan TOML job config")
    known, overrides = parser.parse_known_args(argv)
    for arg in overrides:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
    return known.config, overrides


def load_config(path: str | None, overrides: list[str]):
    from checkpointing import load_job_config

    from .config import validate_rl

    cfg = load_job_config(path, overrides, default_module="rl.config")
    if not hasattr(cfg, "rl") or not hasattr(cfg, "weight_sync"):
        raise ConfigError(
            f"job.custom_config_module = {cfg.job.custom_config_module!r} has no [rl]/[weight_sync] tables; "
            "use 'rl.config' (or a module whose JobConfig extends rl.config.JobConfig)"
        )
    validate_rl(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # DCP says this on every save/load of a single-process job; it is the intended mode here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        path, overrides = parse_args(argv)
        cfg = load_config(path, overrides)
        from .loop import run
        from .remote import ConfigSource

        summary = run(cfg, ConfigSource(path, tuple(overrides)))
    except ConfigError as e:
        print(f"rl-train: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rl-train: interrupted", file=sys.stderr)
        return 130
    print(
        f"rl-train: {summary.steps} steps in {summary.wall_seconds:.1f} s"
        + (f" (resumed from step {summary.resumed_from})" if summary.resumed_from else "")
        + f"; mean reward first 10 steps {summary.reward_first:.3f}, last 10 steps {summary.reward_last:.3f}"
        + f" (margin {summary.margin:+.3f})"
    )
    print(f"rl-train: metrics {summary.metrics_path}" + (f", plot {summary.plot_path}" if summary.plot_path else ""))
    if summary.export_path:
        print(f"rl-train: final export {summary.export_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
