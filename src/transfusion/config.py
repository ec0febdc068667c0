"""Typed configuration: one source of truth for model, diffusion, data, training and evaluation.

A run is described by a TOML file whose tables mirror the dataclasses below ([model], [diffusion], [data],
[train], [eval], [runtime]) plus dotted overrides (`--set train.lr=1e-3`). Unknown keys are errors that list the
valid keys, so a typo never silently falls back to a default.

Sampling settings live in one place, [diffusion] (sample_steps, sampler, cfg_scale), and every command that
samples (the trainer's grids, `sample`, `generate`, `eval`, the demo) reads them there. [runtime] holds how a
process executes (threads, allocator, CPU kernels), never what it computes.

Keys that moved keep loading (`LEGACY_KEYS`): a checkpoint written before the move reads as it sampled then.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem a user can fix (unknown key, bad value, unknown preset)."""


class AttentionMask(str, enum.Enum):
    TRANSFUSION = "transfusion"  # causal + bidirectional within each image (paper Fig. 4)
    CAUSAL = "causal"  # plain causal everywhere (ablation, paper Table 5)


class Family(str, enum.Enum):
    TRANSFUSION = "transfusion"  # images as continuous patches, diffusion loss (the paper's model)
    CHAMELEON = "chameleon"  # images as VQ-VAE tokens in the vocabulary, next-token loss (the paper's baseline)


class AttentionImpl(str, enum.Enum):
    SDPA = "sdpa"  # scaled_dot_product_attention with a dense bool mask (CPU + GPU, has backward)
    FLEX = "flex"  # FlexAttention with a BlockMask built from the same rule (GPU training)


class PatchEncoder(str, enum.Enum):
    LINEAR = "linear"  # paper §3.2: a linear layer, timestep embedding added to the patch first (fn. 6)
    UNET = "unet"  # paper §3.2: U-Net down/up blocks with skips (model/patch.py)


class Prediction(str, enum.Enum):
    EPSILON = "epsilon"  # paper eq. 3: the network predicts the noise
    V = "v"  # an extension (Salimans & Ho 2022): v = sqrt(abar) eps - sqrt(1 - abar) x0, well conditioned at high t


class LossWeighting(str, enum.Enum):
    NONE = "none"  # paper eq. 3: every timestep's MSE counts alike
    MIN_SNR = "min_snr"  # an extension (Hang et al. 2023): per-image weight min(SNR, gamma) / SNR (eps) or
    # min(SNR, gamma) / (SNR + 1) (v): caps the low-noise timesteps' share of the gradient


class Sampler(str, enum.Enum):
    DDPM = "ddpm"  # ancestral sampling (paper default)
    DDIM = "ddim"  # deterministic DDIM (eta = 0), an extension
    EULER = "euler"  # rectified flow (objective = "flow"): first-order ODE steps
    HEUN = "heun"  # rectified flow: second order, two network calls per step


class Objective(str, enum.Enum):
    DDPM = "ddpm"  # paper §2.2: DDPM noising, eps (or v) regression
    FLOW = "flow"  # an extension: rectified flow, velocity regression (diffusion/flow.py)


_SAMPLERS = {Objective.DDPM: (Sampler.DDPM, Sampler.DDIM), Objective.FLOW: (Sampler.EULER, Sampler.HEUN)}


def samplers_for(objective: Objective) -> tuple[Sampler, ...]:
    """The samplers that integrate `objective`'s reverse process."""
    return _SAMPLERS[Objective(objective)]


def _ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple (keeps ~8*dim^2 MLP params)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int = 32_000
    dim: int = 768
    n_layers: int = 16
    n_heads: int = 12
    ffn_hidden: int = 0  # 0 -> Llama rule from dim
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    init_std: float = 0.02
    # images (latents or pixels, paper fn. 3): C x H x W, cut into patch_size x patch_size patches
    image_channels: int = 8
    image_size: int = 32
    patch_size: int = 2
    patch_encoder: PatchEncoder = PatchEncoder.LINEAR
    unet_width: int = 64  # U-Net channels at full resolution, doubled per level (log2(patch_size) levels)
    unet_blocks: int = 1  # ResBlocks per U-Net level, down and up
    # self-attention over the patch grid at the U-Net's lowest level, down and up (paper §4.3.1: "U-Net blocks
    # contain bidirectional attention within"); false = convolutions only (checkpoints from before 2026-12-05)
    unet_attention: bool = True
    # ablation (docs/results.md, Table 5): a layer norm on the U-Net encoder's output before its projection to the
    # transformer's width. Without it the encoder's features grew ~40x in 400 steps at CPU scale
    unet_enc_norm: bool = False
    # the U-Net's skip connections from each down level to the matching up level (Nichol & Dhariwal's U-Net, which
    # the paper cites). With them, the up blocks can denoise from the skips alone and learn to ignore the
    # transformer: at CPU scale they do (docs/results.md, Table 5). false = the up blocks read only the transformer
    unet_skips: bool = True
    # ablation (docs/results.md, Table 5): > 0 layer-normalises each position of the U-Net encoder's output (no
    # affine) and scales it to this rms, so image positions cannot outgrow the residual stream the transformer
    # writes into (unnormalised, a constant vector ~40x the embeddings' scale took over). 0 = unnormalised
    unet_out_rms: float = 0.0
    # extension (paper is silent): a learned 2-D position embedding added to each patch encoding, initialised
    # from 2-D sin-cos, so patches know their row/column beyond the 1-D RoPE position of the sequence. Also for
    # the U-Net: on flat backgrounds its convolutions give every interior patch the same output (docs/results.md)
    patch_pos_emb: bool = False
    # what the linear patch decoder reads: the final-normalised hidden state through a LayerNorm (True), or the raw
    # residual stream before the final norm (False), whose scale carries x_t's (docs/quality.md: the eps ablation)
    patch_out_norm: bool = True
    # init std of the linear patch encoder's input side (timestep MLP and patch projection); 0 -> init_std. The
    # transformer's 0.02 makes the timestep enter at ~0.05 against x_t's ~1 (docs/quality.md); 1/sqrt(fan-in)
    # scales (~0.1-0.15 here) give it and the patch O(1) weight at init
    patch_init_std: float = 0.0
    attention_mask: AttentionMask = AttentionMask.TRANSFUSION
    attention_impl: AttentionImpl = AttentionImpl.SDPA
    # Chameleon's stability changes (Chameleon §2.3; both off = the Llama blocks, bit for bit)
    qk_norm: bool = False  # LayerNorm per head (own affine per head) on q and k, before RoPE
    post_norm: bool = False  # norm reordering: h = x + norm(f(x)) (Chameleon, Swin-v2) instead of x + f(norm(x))
    # which network (docs/sweeps.md): "chameleon" reads images as VQ-VAE codes appended to the vocabulary (ids
    # vocab_size .. vocab_size + codebook_size - 1), one code per patch_size x patch_size pixel patch, so
    # patch_size is the VQ-VAE's downsampling factor and image_channels its input channels
    family: Family = Family.TRANSFUSION
    codebook_size: int = 0  # chameleon: codes of the VQ-VAE (data.vq); transfusion: unused, 0

    def __post_init__(self) -> None:
        self.family = Family(self.family)
        if self.family == Family.CHAMELEON and self.codebook_size < 1:
            raise ConfigError("model.family = \"chameleon\" needs model.codebook_size >= 1 (the VQ-VAE's codes)")
        self.patch_encoder = PatchEncoder(self.patch_encoder)
        self.attention_mask = AttentionMask(self.attention_mask)
        self.attention_impl = AttentionImpl(self.attention_impl)
        # found by fuzzing: n_heads = 0 or patch_size = 0 reached the modulos below (ZeroDivisionError)
        sizes = ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "image_channels", "image_size",
                 "patch_size")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if not self.patch_out_norm and self.patch_encoder != PatchEncoder.LINEAR:
            raise ConfigError("model.patch_out_norm = false is an option of the linear patch decoder")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size={self.image_size} is not divisible by model.patch_size={self.patch_size}"
            )

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden or _ffn_hidden(self.dim)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.image_channels * self.patch_size**2

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model config {name!r}; known: {', '.join(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})


# Paper Table 2 (layers, embedding dim, heads), 32k vocabulary, VAE latents 32x32x8 in 2x2 patches (§4.1),
# plus small configs for CPU work.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "0.16B": dict(n_layers=16, dim=768, n_heads=12),
    "0.37B": dict(n_layers=24, dim=1024, n_heads=16),
    "0.76B": dict(n_layers=24, dim=1536, n_heads=24),
    "1.4B": dict(n_layers=24, dim=2048, n_heads=16),
    "7B": dict(n_layers=32, dim=4096, n_heads=32),
    "tiny": dict(
        n_layers=8, dim=256, n_heads=4, vocab_size=2048, max_seq_len=512,
        image_channels=3, image_size=28, patch_size=4,
    ),
    "micro": dict(
        n_layers=2, dim=64, n_heads=4, vocab_size=2048, max_seq_len=256,
        image_channels=3, image_size=8, patch_size=2,
    ),
}


@dataclass
class DiffusionConfig:
    objective: Objective = Objective.DDPM  # "flow": rectified flow, an option (then prediction is the velocity)
    num_train_steps: int = 1000  # T (paper §2.2)
    schedule: str = "cosine"  # Nichol & Dhariwal 2021, s = 0.008
    prediction: Prediction = Prediction.EPSILON  # what the patch decoder outputs; the loss is MSE on it
    noise_limit: int = 500  # max t for images that come before their caption (paper §4.3.4)
    loss_weighting: LossWeighting = LossWeighting.NONE  # per-timestep weight of the diffusion MSE (an option)
    min_snr_gamma: float = 5.0  # gamma of loss_weighting = "min_snr" (Hang et al.'s default)
    # sampling: the one place every command reads (trainer grids, sample, generate, eval, demo)
    sample_steps: int = 250  # paper §4.1: 250 of the 1000 training steps
    sampler: Sampler = Sampler.DDPM
    cfg_scale: float = 3.0  # paper §4.3 ablations use 3 (§4.2 uses 5)

    def __post_init__(self) -> None:
        self.objective = Objective(self.objective)
        self.prediction = Prediction(self.prediction)
        self.sampler = Sampler(self.sampler)
        self.loss_weighting = LossWeighting(self.loss_weighting)
        if self.loss_weighting != LossWeighting.NONE and self.objective != Objective.DDPM:
            raise ConfigError("diffusion.loss_weighting is a DDPM setting; the flow objective takes 'none'")
        if self.min_snr_gamma <= 0:
            raise ConfigError(f"diffusion.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        if self.sampler not in samplers_for(self.objective):
            raise ConfigError(f"diffusion.sampler={self.sampler.value!r} does not sample the "
                              f"{self.objective.value!r} objective; use one of "
                              f"{[s.value for s in samplers_for(self.objective)]}")
        if self.objective == Objective.FLOW and self.prediction != Prediction.EPSILON:
            raise ConfigError("diffusion.prediction is a DDPM setting; the flow objective predicts the velocity")
        if not 1 <= self.sample_steps <= self.num_train_steps:
            raise ConfigError(f"diffusion.sample_steps={self.sample_steps}: expected 1..{self.num_train_steps} "
                              "(diffusion.num_train_steps)")


@dataclass
class DataConfig:
    dataset: str = "colour_fashion"  # a name in data/registry.py: colour_fashion | folder | edit | recolour | shards
    # DIR of a user's data: images + captions.jsonl ("folder"), + edits.jsonl ("edit"), or the output of
    # `transfusion shard` ("shards", streamed: docs/data.md)
    folder: str = ""
    shuffle_buffer: int = 1000  # "shards": records per stream slot's shuffle buffer (memory: records, not the set)
    loader_workers: int = 1  # "shards": stream slots per rank; the shards are split over world_size x this
    tokenizer: str = ""  # path to tokenizer.json; "" -> the shipped one
    seq_len: int = 256  # packed row length
    image_first_prob: float = 0.2  # paper §4.1: caption first 80%, image first 20%
    caption_dropout: float = 0.1  # captions (edit instructions) dropped so CFG has an unconditional model
    text_ratio: float = 0.5  # fraction of tokens from text-only documents (paper §4.1: ~1:1)
    max_caption_tokens: int = 64  # longest caption (or edit instruction) kept; longer ones are skipped
    use_full_dataset: bool = True  # False -> the committed subset only (tests, CI)
    # probability that an image document is an interleaved 2-image document ("two items: a red sneaker <image>
    # and a blue bag <image>", data/sequences.py), which teaches the model to emit BOI itself and to go on
    # writing after EOI. Needs a dataset with interleaved templates (colour_fashion; a folder has none).
    # 0 draws nothing extra: batches are exactly those of a run without the setting
    interleaved_prob: float = 0.0
    # images as latents (paper §2.3): the run directory of a `transfusion train-vae` autoencoder; "" -> pixels.
    # Then model.image_channels = its latent channels and model.image_size = pixels / its factor (codec.py)
    vae: str = ""
    # the autoencoder's fingerprint, recorded by the trainer: a model is never decoded by another VAE
    vae_fingerprint: str = ""
    # model.family = "chameleon": the VQ-VAE whose codes the images become (a checkpoint or run directory of
    # transfusion.autoencoder), or "fixed:L" — a parameter-free quantiser (chameleon/vq.py: each patch's mean
    # colour in L levels per channel, L**3 codes) for plumbing and tests
    vq: str = ""
    # the text-only documents: text files and JSONL ({"text": ...} per line), or folders of them, instead of
    # Shakespeare (data/text_files.py; docs/data.md); [] -> Shakespeare
    text_files: list[str] = field(default_factory=list)
    # the last text_heldout of each text file (its lines; a JSONL's documents) is the test split (perplexity)
    text_heldout: float = 0.05
    # "folder": share of images held out as the test split by a hash of the image name (as `transfusion shard
    # --val-fraction`); 0 -> lines marked "split": "test" are the test split, or, with none, both splits are all
    val_fraction: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # rows per optimiser step (global)
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    lm_weight: float = 1.0
    diffusion_weight: float = 5.0  # lambda (paper eq. 4)
    # Chameleon's z-loss ("denominator loss", 1e-5 there): z_loss * mean over the LM targets of log^2 Z, Z the
    # softmax normaliser of the LM head's logits; keeps the logits from drifting (losses.py). 0 -> off
    z_loss: float = 0.0
    bf16: bool = False
    ema: float = 0.0  # 0 -> no EMA
    seed: int = 0
    log_every: int = 10
    # TensorBoard event files in OUT/tensorboard/ (rank 0: the metrics.jsonl scalars, MFU, sample grids) when the
    # `tensorboard` package is installed (pip install -e ".[tb]"); without it a one-line note, metrics.jsonl only
    tensorboard: bool = True
    # peak FLOP/s of one rank for the `mfu` of metrics.jsonl, TFLOP/s; 0 -> a known GPU's datasheet or the CPU
    # estimate (train/mfu.py), else mfu is null
    peak_tflops: float = 0.0
    sample_every: int = 0  # 0 -> only at the end
    ckpt_every: int = 200
    max_bad_steps: int = 10  # consecutive NaN/Inf losses before the run stops
    compile: bool = False
    activation_checkpointing: bool = False
    # data parallel (torchrun; see docs/distributed.md)
    fsdp_reshard_after_forward: bool = True  # False: keep gathered block weights until backward (memory for speed)
    hsdp_replicate: int = 1  # > 1: HSDP, shard within groups of world_size/hsdp_replicate ranks, replicate across
    mixed_precision_param: str = "float32"  # FSDP compute dtype of gathered weights: float32 | bfloat16
    mixed_precision_reduce: str = "float32"  # dtype of the gradient reduce-scatter: float32 | bfloat16
    device: str = "auto"  # auto -> cuda when available, else cpu
    keep_checkpoints: int = 2  # newest complete checkpoints kept in OUT/checkpoints (0 -> all)
    sample_n: int = 8  # images in the periodic sample grid (0 -> none)
    time_limit_min: float = 0.0  # stop (with a checkpoint) after this much training time; 0 -> no limit
    # fine-tuning (`train --init-from RUN`): start a fresh run (step 0, new optimiser) from the weights (and EMA)
    # of RUN's latest checkpoint (or that step directory); "" -> random init. Ignored when resuming this run
    init_from: str = ""

    def __post_init__(self) -> None:
        if self.log_every < 1:  # the loop logs at step % log_every == 0: 0 was a ZeroDivisionError mid-run
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")


@dataclass
class EvalConfig:
    n_samples: int = 160  # sampling settings: [diffusion]


@dataclass
class RuntimeConfig:
    """How a process runs (backends/): threads, allocator, CPU kernels. Results are the same up to rounding."""

    threads: int = 0  # intra-op threads; 0 -> torch's default
    tune_malloc: bool = True  # glibc: keep freed activation buffers in the heap (backends/cpu/runtime.py)
    onednn: bool = True  # CPU fp32 Linears through oneDNN; packed weights at inference (backends/cpu/onednn.py)
    math_attention: bool = True  # CPU: explicit matmul-softmax-matmul where it beats SDPA (backends/cpu/attention.py)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_name("tiny"))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Keys that moved: old name -> new name. Old run directories and checkpoints keep loading; where both are given
# the old key wins only if it was the one honoured before the move (the [eval] sampling keys were; [diffusion]'s
# were read by nothing), so a checkpoint samples exactly as it did.
LEGACY_KEYS: dict[str, str] = {
    "train.threads": "runtime.threads",
    "eval.sample_steps": "diffusion.sample_steps",
    "eval.sampler": "diffusion.sampler",
    "eval.cfg_scale": "diffusion.cfg_scale",
}


# Settings added after checkpoints were written, with the value that reproduces those checkpoints: a saved
# config.toml without the key reads as the model it was (a user's config without it gets the new default).
SAVED_DEFAULTS: dict[str, Any] = {
    "model.unet_attention": False,  # added 2026-12-05; earlier U-Nets had no attention block
}


# ---------------------------------------------------------------------------------------------- loading

_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


_PLURAL = {str: "strings", int: "integers"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected one of {[e.value for e in tp]}") from None
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ConfigError(f"{key}={value!r}: expected true/false")
        return bool(value)
    if typing.get_origin(tp) is list:  # list[str] / list[int]: items of that type; one bare item is a list of one
        (item,) = typing.get_args(tp) or (str,)
        if isinstance(value, item) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}={value!r}: expected a list of {_PLURAL.get(item, item.__name__)}")
        return list(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError, OverflowError):  # fuzzing: int(inf) and float(10**400) overflow
            raise ConfigError(f"{key}={value!r}: expected {tp.__name__}") from None
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys under {prefix or 'top level'}: {names}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a table; set its fields, e.g. {full}.{names[0]}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:  # TOML literal (numbers, booleans, quoted strings); bare words stay strings
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML config file; ConfigError when it is missing, not TOML or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale says
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # found by fuzzing: a binary or mis-encoded file escaped as a traceback
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`section.key=value` overrides written into the raw tables (in place; returned for chaining)."""
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a table")
        node[keys[-1]] = value
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None, saved: bool = False) -> Config:
    """Build a Config from an optional TOML file and `section.key=value` overrides.

    `[model] preset = "tiny"` starts the model section from a named preset before applying the other keys.
    `saved`: the file is a checkpoint's own config.toml; keys it predates take SAVED_DEFAULTS.
    """
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    if saved:
        for key, value in SAVED_DEFAULTS.items():
            section, name = key.split(".")
            table = raw.get(section)
            if isinstance(table, dict) and name not in table:
                table[name] = value
    return from_dict(apply_overrides(raw, overrides))


def _migrate(raw: dict[str, Any]) -> None:
    """Move LEGACY_KEYS to their new place in the raw tables (in place)."""
    for old, new in LEGACY_KEYS.items():
        (s_old, k_old), (s_new, k_new) = old.split("."), new.split(".")
        table = raw.get(s_old)
        if isinstance(table, dict) and k_old in table:
            value = table.pop(k_old)
            raw.setdefault(s_new, {})[k_new] = value
            if not table:
                raw.pop(s_old)


def from_dict(raw: dict[str, Any]) -> Config:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name in _SECTIONS:  # found by fuzzing: `model = 0` reached .pop() on an int (AttributeError)
        if name in raw and not isinstance(raw[name], dict):
            raise ConfigError(f"{name} is a table: write [{name}] and its keys, not {name} = {raw[name]!r}")
    _migrate(raw)
    model_raw = raw.pop("model", {})
    preset = model_raw.pop("preset", None)
    try:
        model = ModelConfig.from_name(preset) if preset else ModelConfig.from_name("tiny")
        cfg = Config(model=model)
        _apply(cfg.model, model_raw, "model.")
        cfg.model.__post_init__()  # re-validate after overrides
        _apply(cfg, raw, "")
        cfg.diffusion.__post_init__()
        cfg.train.__post_init__()
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view (enums as values) for saving next to checkpoints as TOML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, enum.Enum):
            v = v.value
        out[f.name] = v
    return out


def dump_toml(cfg: Config) -> str:
    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, str):
                lines.append(f"{k} = {_toml_string(v)}")
            elif isinstance(v, list) and all(isinstance(x, str) for x in v):
                lines.append(f"{k} = [{', '.join(_toml_string(x) for x in v)}]")
            else:
                lines.append(f"{k} = {v!r}")
        lines.append("")
    return "\n".join(lines)


def _toml_string(s: str) -> str:
    """A TOML basic string. Found by fuzzing: writing f'"{s}"' made a config.toml that no longer parsed when a
    setting held a quote, a backslash or a control character (a run's and every checkpoint's config)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids raw control characters in basic strings
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
