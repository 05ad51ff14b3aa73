"""SVD model specs resolved in one place: ``hf:``, ``dir:``, ``random`` (full size) and ``tiny``.

The library's own folder layout (what :func:`save_svd` writes and ``dir:`` reads) is the
diffusers layout of an SVD repository: ``unet/``, ``vae/`` and ``scheduler/`` subfolders, each
written by ``save_pretrained``. A ``hf:`` spec resolves to a hub snapshot in that layout (through
the hub cache; ``HF_HUB_OFFLINE=1`` is honoured by ``huggingface_hub``), so both real sources
share one loading path and one weight-digest path.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel

from foresight.pipelines.svd.fp8 import fp8_supported, quantize_transformer_linears
from foresight.pipelines.svd.unet_split import UNetSplit, check_feature_blocks
from foresight.schemas.model import ModelIdentity, ModelSpec
from foresight.storage.fs import sha256_local_files

log = logging.getLogger(__name__)

FAMILY = "svd"
DEFAULT_SEED = 0
SVD_SUBFOLDERS = ("unet", "vae", "scheduler")

# Compute dtype of each precision name. ``fp8`` runs the transformer Linear layers in e4m3
# (pipelines.svd.fp8) and everything else in float16.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                                  "fp8": torch.float16}

# Scheduler of stabilityai/stable-video-diffusion-img2vid (scheduler/scheduler_config.json).
SVD_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}

# The full SVD UNet (1.52B parameters) at VPP's 256x256 / 16-frame setting; the rest of the
# architecture is the diffusers class default, which is the released SVD configuration.
FULL_UNET_CONFIG: dict[str, Any] = {"sample_size": 32, "num_frames": 16}
FULL_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 256,
}

# A small configuration with the same block structure: 4 UNet levels (so up_blocks[0..1] exist
# at 1/4 and 1/2 of the latent size), cross-attention width 32 = 2 x the tiny CLIP text width 16.
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "num_frames": 4,
    "block_out_channels": [32, 32, 64, 64],
    "num_attention_heads": [2, 2, 4, 4],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 32,
}


@dataclass
class SVDModel:
    """Loaded SVD components on one device, plus the identity a manifest records.

    ``vae`` runs in the model dtype (decoding); ``vae_encoder`` is an fp32 copy of the encoder
    half, because the image latent is computed once per clip and fp16 VAE encoding is lossy
    (diffusers upcasts it for the same reason)."""

    unet: UNetSpatioTemporalConditionModel
    vae: AutoencoderKLTemporalDecoder
    vae_encoder: torch.nn.Module
    scheduler_config: dict[str, Any]
    identity: ModelIdentity
    device: torch.device
    dtype: torch.dtype
    precision: str = "fp32"
    compile_kwargs: dict | None = None  # torch.compile arguments of the UNet halves (None: eager)
    _splits: dict[int, UNetSplit] = field(default_factory=dict, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one axis."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def split(self, feature_blocks: list[int]) -> UNetSplit:
        """The UNet split after the last of ``feature_blocks`` (built once per split point, compiled
        when ``compile_kwargs`` is set); ValueError naming a block the UNet does not have."""
        last = check_feature_blocks(self.unet, feature_blocks)
        if last not in self._splits:
            self._splits[last] = UNetSplit(self.unet, last, self.compile_kwargs)
        return self._splits[last]

    def compile_unet(self, compile_kwargs: dict | None) -> None:
        """``torch.compile`` the UNet halves with these arguments from the next call on (None: eager)."""
        self.compile_kwargs = compile_kwargs
        self._splits.clear()

    def new_scheduler(self) -> EulerDiscreteScheduler:
        """A fresh scheduler: its step index is per-trajectory state, never shared between calls."""
        return EulerDiscreteScheduler.from_config(self.scheduler_config)


class VaeEncoderHalf(torch.nn.Module):
    """The encoder + quant conv of a VAE; returns the posterior mode (the SVD image latent)."""

    def __init__(self, vae: AutoencoderKLTemporalDecoder):
        super().__init__()
        self.encoder = copy.deepcopy(vae.encoder)
        self.quant_conv = copy.deepcopy(vae.quant_conv)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(images_BCHW))
        mean, _logvar = moments.chunk(2, dim=1)
        return mean


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' | 'fp8' -> compute dtype (fp8: float16 around the e4m3 products);
    ValueError naming the value otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_folder(spec: ModelSpec, allow_patterns: list[str] | None = None) -> Path:
    """The local folder holding a real (hf/dir) spec's files.

    ``hf:`` goes through ``huggingface_hub.snapshot_download`` so the hub cache and
    ``HF_HUB_OFFLINE`` behave as everywhere else; ``dir:`` must exist."""
    if spec.source == "dir":
        folder = Path(spec.ref).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model spec {spec}: folder {folder} does not exist")
        return folder
    if spec.source == "hf":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(spec.ref, revision=spec.revision, allow_patterns=allow_patterns))
        except Exception as err:  # hub errors have many types; the message is what the user needs
            raise ValueError(f"model spec {spec}: cannot resolve hub snapshot "
                             f"({err.__class__.__name__}: {err})") from None
    raise ValueError(f"model spec {spec}: not a real-weights spec (hf:/dir:)")


def real_identity(spec: ModelSpec, folder: Path, subfolders: tuple[str, ...], family: str) -> ModelIdentity:
    """Identity of weights read from ``folder``: sha256 of every weight file under ``subfolders``."""
    digests: dict[str, str] = {}
    for sub in subfolders:
        base = folder / sub if sub else folder
        for rel, digest in sha256_local_files(base).items():
            digests[f"{sub}/{rel}" if sub else rel] = digest
    if not digests:
        raise ValueError(f"model spec {spec}: no weight files (*.safetensors, *.bin) under {folder}")
    return ModelIdentity(spec=str(spec), family=family, source=spec.source, ref=spec.ref,
                         revision=spec.revision, weights_sha256=digests)


def _class_defaults(cls: type) -> dict[str, Any]:
    """Constructor defaults of a diffusers model class, JSON-friendly (tuples as lists)."""
    params = inspect.signature(cls.__init__).parameters
    return {name: list(p.default) if isinstance(p.default, tuple) else p.default
            for name, p in params.items() if name != "self" and p.default is not inspect.Parameter.empty}


def _architecture(source: str) -> dict[str, dict[str, Any]]:
    """Complete UNet / VAE / scheduler configs of ``random`` or ``tiny`` (recorded in the identity)."""
    tiny = source == "tiny"
    unet_over, vae_over = (TINY_UNET_CONFIG, TINY_VAE_CONFIG) if tiny else (FULL_UNET_CONFIG, FULL_VAE_CONFIG)
    return {
        "unet": {**_class_defaults(UNetSpatioTemporalConditionModel), **unet_over},
        "vae": {**_class_defaults(AutoencoderKLTemporalDecoder), **vae_over},
        "scheduler": dict(SVD_SCHEDULER_CONFIG),
    }


@dataclass
class SVDDescription:
    """What a spec names, known without loading weights: identity and component configs."""

    identity: ModelIdentity
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    folder: Path | None = None


def _public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def describe_svd(spec: str | ModelSpec, seed: int = DEFAULT_SEED) -> SVDDescription:
    """Identity (weight digests for hf/dir; seed + config for random/tiny) and configs of ``spec``.

    Cheap next to loading: flows key a version with it before any worker loads the model."""
    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.source == "null":  # the tiny architecture's shapes, nothing to load (pipelines/null_models.py)
        from foresight.pipelines.null_models import null_identity

        arch = _architecture("tiny")
        return SVDDescription(null_identity(FAMILY, arch), arch["unet"], arch["vae"], arch["scheduler"])
    if spec.source in ("random", "tiny"):
        arch = _architecture(spec.source)
        identity = ModelIdentity(spec=str(spec), family=FAMILY, source=spec.source, seed=seed, config=arch)
        return SVDDescription(identity, arch["unet"], arch["vae"], arch["scheduler"])
    folder = resolve_folder(spec, allow_patterns=[f"{sub}/*" for sub in SVD_SUBFOLDERS] + ["model_index.json"])
    for sub in SVD_SUBFOLDERS:
        if not (folder / sub).is_dir():
            raise ValueError(f"model spec {spec}: {folder} has no '{sub}/' folder (expected {list(SVD_SUBFOLDERS)})")
    return SVDDescription(
        identity=real_identity(spec, folder, ("unet", "vae"), FAMILY),
        unet_config=_public(UNetSpatioTemporalConditionModel.load_config(folder / "unet")),
        vae_config=_public(AutoencoderKLTemporalDecoder.load_config(folder / "vae")),
        scheduler_config=_public(EulerDiscreteScheduler.load_config(folder / "scheduler")),
        folder=folder,
    )


def _build_random(desc: SVDDescription, device: torch.device):
    """Seeded random UNet + VAE, built directly on ``device``: initialising 1.5B parameters on
    the CPU takes longer than a benchmark run, and ``random`` weights only need to be repeatable
    on the same hardware."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(desc.identity.seed or 0)
        with torch.device(device):
            unet = UNetSpatioTemporalConditionModel.from_config(desc.unet_config)
            vae = AutoencoderKLTemporalDecoder.from_config(desc.vae_config)
    return unet, vae


def load_svd(spec: str | ModelSpec | SVDDescription, device: str | torch.device = "cpu", dtype: str = "fp32",
             seed: int = DEFAULT_SEED) -> SVDModel:
    """Load the SVD UNet, VAE and scheduler named by ``spec`` onto ``device`` in ``dtype``.

    ``seed`` only matters for ``random``/``tiny`` (it is recorded in the identity). A
    :class:`SVDDescription` may be passed instead of a spec to skip re-hashing weight files.
    ``dtype="fp8"`` loads float16 weights and quantises the transformer Linear layers to e4m3."""
    desc = spec if isinstance(spec, SVDDescription) else describe_svd(spec, seed)
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype)
    if desc.identity.is_null:
        from foresight.pipelines.null_models import null_svd

        return null_svd(desc, device, torch_dtype, dtype)
    if dtype == "fp8" and not fp8_supported(device):
        raise ValueError(f"SVD {desc.identity.spec}: dtype fp8 needs a GPU of compute capability >= 8.9 "
                         f"(or the CPU), not {device}")
    if desc.folder is None:
        unet, vae = _build_random(desc, device)
    else:
        unet = UNetSpatioTemporalConditionModel.from_pretrained(desc.folder / "unet")
        vae = AutoencoderKLTemporalDecoder.from_pretrained(desc.folder / "vae")
    encoder = VaeEncoderHalf(vae).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    unet = _place(unet, device, torch_dtype)
    vae = _place(vae, device, torch_dtype)
    log.info("loaded SVD %s on %s (%s): unet %.1fM parameters", desc.identity.spec, device, dtype,
             sum(p.numel() for p in unet.parameters()) / 1e6)
    if dtype == "fp8":
        log.info("SVD UNet: %d transformer Linear layers quantised to e4m3", quantize_transformer_linears(unet))
    return SVDModel(unet=unet, vae=vae, vae_encoder=encoder, scheduler_config=desc.scheduler_config,
                    identity=desc.identity, device=device, dtype=torch_dtype, precision=dtype)


def svd_from_state_dicts(identity: ModelIdentity, unet_config: dict[str, Any], vae_config: dict[str, Any],
                         scheduler_config: dict[str, Any], unet_state: dict[str, torch.Tensor],
                         vae_state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                         dtype: str = "fp32") -> SVDModel:
    """An :class:`SVDModel` from diffusers-named state dicts and their configs (a conformance
    fixture's ``model_unet.safetensors`` / ``model_vae.safetensors`` with ``config.json``).

    Loading is strict: a missing or unexpected key is a ValueError naming it."""
    device, torch_dtype = torch.device(device), parse_dtype(dtype)
    unet = UNetSpatioTemporalConditionModel.from_config(unet_config)
    vae = AutoencoderKLTemporalDecoder.from_config(vae_config)
    for name, module, state in (("unet", unet, unet_state), ("vae", vae, vae_state)):
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"SVD {identity.spec} {name}: missing keys {sorted(missing)[:5]}, "
                             f"unexpected keys {sorted(unexpected)[:5]}")
    encoder = VaeEncoderHalf(vae.float()).to(device=device).eval().requires_grad_(False)
    return SVDModel(unet=_place(unet.float(), device, torch_dtype), vae=_place(vae, device, torch_dtype),
                    vae_encoder=encoder, scheduler_config=dict(scheduler_config), identity=identity,
                    device=device, dtype=torch_dtype, precision=dtype)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to(device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def save_svd(model: SVDModel, folder: str | Path) -> Path:
    """Write ``model`` in the library's folder layout (readable back through ``dir:<folder>``)."""
    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    EulerDiscreteScheduler.from_config(model.scheduler_config).save_pretrained(folder / "scheduler")
    return folder
