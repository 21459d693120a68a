"""``titan-train``: TorchTitan's own trainer (``torchtitan.train.main(Trainer)``, unmodified),
checkpointing through :class:`~checkpointing.Checkpointer`, on a laptop as on a GPU node.

    titan-train --job.config_file configs/titan_llama3_debug.toml [--section.key=value ...]

Same flags as ``python -m torchtitan.train`` (TorchTitan parses them). What it adds:

* the checkpointer switch of :mod:`checkpointing.torchtitan`, installed directly (the TOML's
  ``[experimental] custom_import`` line is then optional; ``[job] custom_config_module =
  "checkpointing.config"`` is still needed, for the ``backend`` key);
* the config checked before anything starts: an unknown key, a wrong type, an unknown or
  unsuitable backend is one line on stderr and exit 2, not a traceback after the model is built;
* no torchrun needed: outside torchrun it runs as a one-process job (the rendezvous variables
  torchrun would set, with a free local port); under torchrun it leaves them alone;
* without an accelerator, the CPU shims of :mod:`checkpointing.torchtitan_cpu`, logged.

Exit status (as ``ckpt``): 0 done, 1 a checkpoint was damaged or unsafe, 2 a config or usage
mistake (a bad key, a missing step); any other failure is TorchTitan's own traceback.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

from .errors import CheckpointError, ConfigError, CorruptCheckpointError

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2
CONFIG_FILE_FLAGS = ("--job.config_file", "--job.config-file")


def split_config_file(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the ``--job.config_file`` value, the other arguments), both spellings, ``=`` or not."""
    rest: list[str] = []
    path = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in CONFIG_FILE_FLAGS:
            if eq:
                path = value
            elif i + 1 < len(args):
                path = args[i + 1]
                i += 1
            i += 1
            continue
        rest.append(arg)
        i += 1
    return path, rest


def check_config(argv: Sequence[str]) -> None:
    """Parse the job config the way TorchTitan will, with our typed checks on top; raise
    ConfigError naming the key (and the file) on any mistake."""
    from .config import load_job_config, read_toml
    from .torchtitan import CONFIG_MODULE, check_trainer_config

    path, overrides = split_config_file(argv)
    if path is None:
        raise ConfigError("give the job config: titan-train --job.config_file FILE.toml [--section.key=value ...]")
    job = read_toml(path).get("job", {})
    named = job.get("custom_config_module") if isinstance(job, dict) else None
    if not named and not any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in overrides):
        raise ConfigError(
            f"{path} has no [job] custom_config_module; add custom_config_module = {CONFIG_MODULE!r} under [job] "
            "so TorchTitan's parser knows [checkpoint] backend"
        )
    cfg = load_job_config(path, overrides)
    check_trainer_config(cfg.checkpoint)


def single_process_env() -> None:
    """What torchrun would set for one process, so TorchTitan's ``init_process_group`` (env://)
    and its ``os.environ['LOCAL_RANK']`` work without a launcher. Untouched under torchrun."""
    if "RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    """The console script. TorchTitan's ``main`` reads ``sys.argv`` itself, so this does too."""
    argv = sys.argv[1:]
    if not any(a in ("-h", "--help") for a in argv):
        try:
            check_config(argv)
        except ConfigError as e:
            print(f"titan-train: config error: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return _run_torchtitan()
    except CorruptCheckpointError as e:
        print(f"titan-train: checkpoint damaged or unsafe: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    except ConfigError as e:
        print(f"titan-train: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as e:  # e.g. load_step names a step that is not there
        print(f"titan-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run_torchtitan() -> int:
    from torchtitan.tools.logging import init_logger

    from . import torchtitan as switch
    from . import torchtitan_cpu

    init_logger()  # TorchTitan's format, so the lines below read like the rest of the run
    single_process_env()
    switch.install()
    torchtitan_cpu.apply_if_no_accelerator()

    import torchtitan.train as train

    train.main(train.Trainer)  # parses sys.argv[1:] itself, exactly as `python -m torchtitan.train`
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
