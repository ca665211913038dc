"""The five sections of a resolved config (meanflow.config.Config.data, .model, .meanflow, .train,
.sample) as frozen dataclasses whose fields are written here, so grep and editors find
`cfg.train.steps`. Every key of workflow/schemas/params.schema.yaml is a field; the schema holds
the defaults, bounds and descriptions, and tests/test_config.py fails when a field and the schema's
key differ in name, order or type. Arrays are tuples (a config is frozen)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """Section `data`: where the images come from, how they become the training store, and the FID reference."""

    dataset: str
    resolution: int
    channels: int
    input_size: int
    num_classes: int
    root: str
    source: str
    source_path: str | None
    md5: dict
    hf_repo: str
    hf_revision: str
    splits: tuple[str, ...]
    encode_split: str
    vae: str | None
    vae_revision: str | None
    latent_scale: float
    flip: bool
    augment: float
    shard_size: int
    encode_batch: int
    workers: int
    skip_corrupt: bool
    device: str
    refstats_source: str
    refstats_npz: str | None
    inception_weights: str | None
    fid_extractor: str
    fid_feature: str
    refstats_batch: int
    threads: int


@dataclass(frozen=True)
class ModelConfig:
    """Section `model`: the network: a named or custom DiT, the U-Net, the toy MLP or the iMF DiT."""

    arch: str
    name: str
    depth: int | None
    hidden: int | None
    heads: int | None
    patch: int | None
    mlp_ratio: float
    time_cond: str
    t_scale: float
    channels: int
    channel_mult: tuple[int, ...]
    layers_per_block: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    cond: str
    tokens: tuple[int, int, int, int]
    head_depth: int
    swiglu: bool
    rmsnorm: bool
    rope: bool
    qk_norm: bool
    init: str


@dataclass(frozen=True)
class MeanflowConfig:
    """Section `meanflow`: the objective: (t, r) draws, jvp tangent and API, adaptive weight, guidance; iMF's keys."""

    ratio: float
    sampler: str
    mean: float
    std: float
    tangent: str
    p: float
    eps: float
    omega: float
    kappa: float
    t_start: float
    t_end: float
    class_drop: float
    mask_layout: str
    strategy: str
    jvp_api: str
    jvp_fp32: bool
    objective: str
    v_source: str
    omega_cond: bool
    interval_cond: bool
    s_max: float
    cfg_beta: float
    null_omega: str
    drop_tangent: str


@dataclass(frozen=True)
class TrainConfig:
    """Section `train`: the train stage: steps, optimiser, EMA, seeds and replicates, checkpoints, logging."""

    steps: int
    batch: int
    accum: int | str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    ema: float
    seed: int
    warmup_steps: int
    warmup_start: float
    precision: str
    epochs: int | None
    replicates: int
    group_replicas: bool
    runs_root: str
    device: str
    ckpt_every: int
    keep_ckpts: int
    keep_ckpts_done: int
    threads: int
    log_every: int
    compile: bool


@dataclass(frozen=True)
class SampleConfig:
    """Section `sample`: the sample and fid stages: NFE and schedule, labels, counts, feature space, guidance."""

    nfe: tuple[int, ...]
    schedule: tuple[float, ...] | None
    t_mid: float
    labels: str
    n: int
    seed: int
    shard_size: int
    batch: int
    device: str
    weights: str | None
    grid: int
    features: str
    fid_batch: int
    reference: str
    reference_npz: str | None
    threads: int
    guidance: dict


SECTIONS = {"data": DataConfig, "model": ModelConfig, "meanflow": MeanflowConfig, "train": TrainConfig,
            "sample": SampleConfig}
