"""The RL job's TOML: TorchTitan's tables, ``[checkpoint]``, and the tables the RL loop adds.

Two Checkpointer roles share one config type on purpose: ``[checkpoint]`` holds resumable
training state (model, optimizer, lr, prompt sampler, train state), ``[weight_sync]`` is the
trainer -> generator handoff (model only), ``[export]`` is the final model-only export. Each is a
:class:`checkpointing.CheckpointConfig`, so swapping what carries the weights is one TOML line
(``[weight_sync] backend = ...``) and the loop never looks at the name.

Load with ``checkpointing.load_job_config(path, overrides, default_module="rl.config")`` (what
:func:`rl.cli.main` does); TorchTitan's ConfigManager merges :class:`JobConfig` into its own.
No ``from __future__ import annotations`` here: ConfigManager merges nested tables by looking at
real dataclass types, not strings.
"""

from dataclasses import dataclass, field

from checkpointing import CheckpointConfig, ConfigError
from checkpointing import JobConfig as CheckpointJobConfig

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
PROCESS_MODES = ("colocated", "separate")
VLLM_PROCESS_MODES = ("auto", "multiprocess", "in_process")


class _ValidatedLater:
    """CheckpointConfig validates in ``__post_init__``; raised inside TorchTitan's command-line
    parser that becomes a usage box. We validate these tables after parsing instead
    (:func:`validate_rl`), under the name the user wrote (``weight_sync.backend``)."""

    table = "checkpoint"

    def __post_init__(self) -> None:
        pass


def retitle(message: str, table: str) -> str:
    return message.replace("checkpoint.", f"{table}.")


@dataclass
class WeightSyncConfig(_ValidatedLater, CheckpointConfig):
    """``[weight_sync]``: the trainer publishes after every optimizer step, the generator pulls.

    Defaults differ from ``[checkpoint]`` (on, every step, its own folder, two versions kept) so
    a config that only names the backend already does the right thing."""

    table = "weight_sync"
    enable: bool = True
    folder: str = "weight_sync"
    interval: int = 1
    keep_latest_k: int = 2
    last_save_model_only: bool = False


@dataclass
class ExportConfig(_ValidatedLater, CheckpointConfig):
    """``[export]``: one model-only save of the final policy (``last_step``), e.g. Hugging Face
    safetensors for transformers / vLLM."""

    table = "export"
    enable: bool = True
    backend: str = "hf"
    folder: str = "export"
    last_save_model_only: bool = True
    keep_latest_k: int = 0


@dataclass
class RLConfig:
    """``[rl]``: the GRPO loop, the generator and the task."""

    task: str = "reverse"
    """Task name from :mod:`rl.tasks` (``reverse``, ``sort``, ``copy``, ``pattern``)."""
    task_length: int = 4
    """Digits in a problem (prompt and answer length)."""
    alphabet_size: int = 10
    """Prompts use the digits 0 .. alphabet_size-1 (2 to 10)."""
    prompts_per_step: int = 16
    """Distinct prompts per rollout batch."""
    group_size: int = 8
    """Completions sampled per prompt; GRPO normalizes rewards within each group."""
    max_new_tokens: int = 4
    """Completion budget; at least the answer's length (generation also stops at EOS)."""
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "torch"
    """Generation engine: ``torch`` (pure PyTorch, CPU/GPU) or ``vllm`` (optional extra, vLLM 0.32
    on CPU or CUDA; see docs/rl.md)."""
    generator_dtype: str = "float32"
    """Dtype of the generator's model copy (``bfloat16`` halves it; the trainer stays fp32)."""
    device: str = "auto"
    """``auto``: CUDA when available, else CPU. Used by trainer and generator."""
    clip_eps: float = 0.2
    """PPO clip range of the ratio new / behavior policy."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to the initial policy (0: no reference model is kept)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (keeps a tiny policy exploring; 0: plain GRPO)."""
    normalize_std: bool = True
    """Divide group-centred rewards by the group's std (GRPO); false keeps only the centring."""
    process_mode: str = "colocated"
    """``colocated``: generator in this process. ``separate``: generator in its own process
    (spawned), pulling weights through the same ``[weight_sync]`` config."""
    seed: int = 0
    """Seeds the initial weights, the prompts and the sampling of every step."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default)."""
    sync_timeout_s: float = 60.0
    """How long a generator waits for the expected policy version before it reports stale."""
    progress: bool = True
    """Show the tqdm progress bar."""
    plot: bool = True
    """Write ``metrics.png`` (reward and weight-sync time per step) at the end."""
    vllm_process_mode: str = "auto"
    """Where vLLM's engine core (and so its worker's weight_sync Checkpointer) runs:
    ``multiprocess`` (vLLM's default: a child process; the weight_sync backend must reach other
    processes, e.g. memory ``shm``, dcp, hf), ``in_process`` (this process; memory ``local``
    works), or ``auto``: multiprocess when the weight_sync backend as configured reaches another
    process, else in_process."""
    vllm_kv_cache_mb: int = 64
    """vLLM's KV cache, MiB (``kv_cache_memory_bytes``). On CPU this is the only sizing that
    means what it says: ``gpu_memory_utilization`` there is a share of host RAM."""
    vllm_gpu_memory_utilization: float = 0.3
    """CUDA only: the share of GPU memory vLLM may take (the trainer shares the GPU)."""


@dataclass
class JobConfig(CheckpointJobConfig):
    """What ``[job] custom_config_module = "rl.config"`` adds to TorchTitan's JobConfig."""

    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    rl: RLConfig = field(default_factory=RLConfig)


def validate_rl(cfg) -> None:
    """Checks that need the registries (tasks, engines, model flavors) or span tables."""
    from .engines import available_engines
    from .model import resolve_model_args
    from .tasks import available_tasks, get_task

    rl = cfg.rl
    for table in ("weight_sync", "export"):
        validate_table(table, getattr(cfg, table))
    if rl.task not in available_tasks():
        raise ConfigError(f"rl.task = {rl.task!r} is not a known task; allowed: {', '.join(available_tasks())}")
    if rl.engine not in available_engines():
        raise ConfigError(f"rl.engine = {rl.engine!r} is not a known engine; allowed: {', '.join(available_engines())}")
    _one_of("rl.generator_dtype", rl.generator_dtype, DTYPES)
    _one_of("rl.device", rl.device, DEVICES)
    _one_of("rl.process_mode", rl.process_mode, PROCESS_MODES)
    _one_of("rl.vllm_process_mode", rl.vllm_process_mode, VLLM_PROCESS_MODES)
    for key in ("prompts_per_step", "group_size", "max_new_tokens", "task_length", "vllm_kv_cache_mb"):
        if getattr(rl, key) < 1:
            raise ConfigError(f"rl.{key} = {getattr(rl, key)}; it must be >= 1")
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size = {rl.group_size}; GRPO needs >= 2 completions per prompt to compare")
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature = {rl.temperature}; it must be > 0")
    if not 0 < rl.top_p <= 1:
        raise ConfigError(f"rl.top_p = {rl.top_p}; allowed: 0 < top_p <= 1")
    if rl.clip_eps <= 0 or rl.kl_coef < 0 or rl.entropy_coef < 0:
        raise ConfigError(
            f"rl.clip_eps = {rl.clip_eps}, rl.kl_coef = {rl.kl_coef}, rl.entropy_coef = {rl.entropy_coef}; "
            "need clip_eps > 0, kl_coef >= 0, entropy_coef >= 0"
        )
    if cfg.training.steps < 1:
        raise ConfigError(f"training.steps = {cfg.training.steps}; it must be >= 1")
    if not cfg.weight_sync.enable:
        raise ConfigError("weight_sync.enable = false: the generator would never see a new policy; set it to true")
    task = get_task(rl.task, rl.task_length, rl.alphabet_size)
    args = resolve_model_args(cfg.model.name, cfg.model.flavor)
    from .tokenizer import load_tokenizer

    vocab = load_tokenizer().get_vocab_size()
    if args.vocab_size < vocab:
        raise ConfigError(
            f"model {cfg.model.name}/{cfg.model.flavor} has vocab_size {args.vocab_size}, smaller than the shipped "
            f"tokenizer's {vocab}; pick a flavor with vocab_size >= {vocab} (e.g. rl_tiny)"
        )
    need = task.prompt_length + rl.max_new_tokens
    if args.max_seq_len < need:
        raise ConfigError(f"model max_seq_len {args.max_seq_len} < prompt + rl.max_new_tokens = {need}")
    if rl.max_new_tokens < task.answer_length:
        raise ConfigError(
            f"rl.max_new_tokens = {rl.max_new_tokens}; task {rl.task!r} answers need {task.answer_length} tokens"
        )
    _check_folders(cfg)


def validate_table(table: str, config: CheckpointConfig) -> None:
    """The shared ``[checkpoint]`` checks (backend registered, ranges, ...) for another role."""
    try:
        CheckpointConfig.__post_init__(config)
    except ConfigError as e:
        raise ConfigError(retitle(str(e), table)) from None


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}; allowed: {', '.join(allowed)}")


def _check_folders(cfg) -> None:
    """Two roles in one folder would retire each other's steps (keep_latest_k)."""
    roles = [("checkpoint", cfg.checkpoint), ("weight_sync", cfg.weight_sync), ("export", cfg.export)]
    seen: dict[str, str] = {}
    for name, c in roles:
        if not c.enable:
            continue
        if c.folder in seen:
            raise ConfigError(
                f"{name}.folder = {c.folder!r} is also {seen[c.folder]}.folder; each Checkpointer role needs its own folder"
            )
        seen[c.folder] = name
