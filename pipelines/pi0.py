"""π0 teacher targets for Shallow-π: model loading, sample assembly, fixed (t, noise) pairs,
teacher velocities and head-averaged action-query attention over the vision-language keys.

Pure compute: functions take arrays and records and return arrays. The only side effect is model
loading through :func:`load_pi0`. The model is transformers' ``PI0ForConditionalGeneration`` (or
``PI05ForConditionalGeneration``, π0.5: see :data:`FAMILIES`):
a PaliGemma VLM (SigLIP + Gemma language stack) whose per-layer key/value cache of the prefix
(images + instruction) is read by the Gemma action expert ("dit"), layer i of the expert
attending to the prefix of VLM layer i. The suffix fed to the expert is [state, 50 noisy actions].

Flow-matching convention (transformers/openpi): ``x_t = t * noise + (1 - t) * actions``, target
velocity ``u = noise - actions``, ``t ~ Beta(1.5, 1) * 0.999 + 0.001``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity, ModelSpec

log = logging.getLogger(__name__)

STAGE = "pi0.targets"
STAGE_VERSION = 1
"""Bump by hand when the target computation changes (it is part of every pi0 version id)."""

TINY_SEED = 0
RANDOM_SEED = 0
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
"""PI0ImageProcessor normalises with IMAGENET_STANDARD mean/std (0.5, 0.5): pixels in [-1, 1]."""
BYTE_TOKEN_OFFSET = 3
BYTE_PAD_ID, BYTE_BOS_ID = 0, 2
"""Byte-level tokenizer for random/tiny models and checkpoints without tokenizer files."""


FAMILIES = ("pi0", "pi05")
"""Teacher families: π0 (``PI0ForConditionalGeneration``: the state is a token of the expert's
suffix) and π0.5 (``PI05ForConditionalGeneration``: the state is discretised into the prompt, the
expert's norms are modulated by the time embedding, the suffix is the 50 actions alone)."""


# ----------------------------------------------------------------------------- configs
def family_classes(family: str) -> tuple[Any, Any]:
    """(config class, model class) of a teacher family; ValueError naming the known ones otherwise."""
    import transformers

    names = {"pi0": ("PI0Config", "PI0ForConditionalGeneration"),
             "pi05": ("PI05Config", "PI05ForConditionalGeneration")}
    if family not in names:
        raise ValueError(f"π0 family {family!r}: expected one of {', '.join(FAMILIES)}")
    config_name, model_name = names[family]
    if not hasattr(transformers, model_name):
        raise ValueError(f"π0 family {family!r}: transformers {transformers.__version__} has no {model_name}")
    return getattr(transformers, config_name), getattr(transformers, model_name)


def model_family(model: Any) -> str:
    """'pi05' for a π0.5 model (or config), else 'pi0'."""
    config = getattr(unwrap(model), "config", model)
    return "pi05" if getattr(config, "model_type", "pi0") == "pi05" else "pi0"


def tiny_config(num_layers: int = 4, image_size: int = 28, family: str = "pi0") -> Any:
    """A small π0 (or π0.5) config (both stacks ``num_layers`` deep) for tests and the CPU demo."""
    config_class, _ = family_classes(family)
    return config_class(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(model_type="gemma", hidden_size=64, num_hidden_layers=num_layers,
                             intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=16, vocab_size=320),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               patch_size=14, image_size=image_size, num_hidden_layers=2,
                               num_attention_heads=2, vision_use_head=False),
            projection_dim=64, image_token_id=320),
        # The expert's head_dim and KV heads must match the VLM's: it appends to the VLM's cache.
        dit_config=dict(model_type="gemma", hidden_size=32, num_hidden_layers=num_layers, intermediate_size=64,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    )


def full_config(family: str = "pi0") -> Any:
    """The full-size π0 / π0.5 config (PaliGemma 3B + 300M Gemma expert, 18 layers each)."""
    return family_classes(family)[0]()


def num_layers(model: Any) -> int:
    """Depth shared by the VLM language stack and the action expert (asserted equal)."""
    cfg = model.config
    depth = cfg.vlm_config.text_config.num_hidden_layers
    assert depth == cfg.dit_config.num_hidden_layers, "π0 stacks must have the same depth"
    return depth


def tokens_per_image(config: Any) -> int:
    """Number of SigLIP patch tokens per camera image (256 for 224 px / patch 14)."""
    vision = config.vlm_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def image_size(config: Any) -> int:
    return int(config.vlm_config.vision_config.image_size)


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadedPi0:
    """A loaded π0 model, its tokenizer (None = byte-level) and the identity a manifest records."""

    model: Any
    tokenizer: Any | None
    identity: ModelIdentity

    @property
    def tokenizer_kind(self) -> str:
        return "bytes" if self.tokenizer is None else "checkpoint"


def load_pi0(spec: str, device: str = "cpu", dtype: str = "float32", tiny_layers: int = 4,
             family: str = "pi0") -> LoadedPi0:
    """Load a π0 or π0.5 teacher from a model spec (``hf:``, ``dir:``, ``random`` or ``tiny``).

    ``random`` is the full-size architecture initialised on ``device`` (fast on a GPU; the init
    device is part of the identity because CPU and CUDA random streams differ). ``tiny`` is a
    small config with both stacks ``tiny_layers`` deep, always initialised on the CPU. ``family``
    picks the architecture of ``random``/``tiny``; a checkpoint's own config.json decides for it.
    """
    parsed = ModelSpec.parse(spec)
    torch_dtype = _torch_dtype(dtype)
    if parsed.source == "null":
        from foresight.pipelines.null_models import null_pi0

        return null_pi0(tiny_layers, family)
    if parsed.source in ("hf", "dir"):
        return _load_checkpoint(spec, parsed, device, torch_dtype)
    _, model_class = family_classes(family)
    config = tiny_config(tiny_layers, family=family) if parsed.source == "tiny" else full_config(family)
    seed = TINY_SEED if parsed.source == "tiny" else RANDOM_SEED
    init_device = torch.device("cpu" if parsed.source == "tiny" else device)
    # A private RNG state: loading a model must not move the caller's random streams.
    with torch.random.fork_rng(devices=[init_device] if init_device.type == "cuda" else []):
        torch.manual_seed(seed)
        with init_device:
            model = model_class(config)
            if family == "pi05":
                randomize_adaptive_norms(model)
    model = model.to(device=device, dtype=torch_dtype).eval()
    architecture = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    identity_config = {**architecture, "init_device": init_device.type}
    identity = ModelIdentity(spec=spec, family=family, source=parsed.source, seed=seed,
                             config=_json_safe(identity_config))
    return LoadedPi0(model=model, tokenizer=None, identity=identity)


def randomize_adaptive_norms(model: Any) -> None:
    """Draw π0.5's adaptive-norm projections like its other linear layers (normal, initializer_range).

    transformers initialises them to zero, so each expert layer's residual gate is 0 and the expert
    is the identity: every layer cut of such a random teacher would equal it exactly, and a random
    or tiny π0.5 could not stand for a trained one in tests and benchmarks.
    """
    std = model.config.dit_config.initializer_range
    for module in model.model.dit.modules():
        if type(module).__name__ == "PI05AdaptiveRMSNorm":
            torch.nn.init.normal_(module.dense.weight, std=std)
            torch.nn.init.zeros_(module.dense.bias)


def _load_checkpoint(spec: str, parsed: ModelSpec, device: str, torch_dtype: torch.dtype) -> LoadedPi0:
    import json

    from foresight.storage.fs import sha256_local_files

    folder = _checkpoint_folder(parsed)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model spec {spec!r}: no config.json in {folder}")
    family = "pi05" if json.loads((folder / "config.json").read_text()).get("model_type") == "pi05" else "pi0"
    model = family_classes(family)[1].from_pretrained(str(folder), dtype=torch_dtype)
    model = model.to(device).eval()
    identity = ModelIdentity(spec=spec, family=family, source=parsed.source, ref=parsed.ref,
                             revision=parsed.revision, weights_sha256=sha256_local_files(folder))
    if not identity.weights_sha256:
        raise ValueError(f"model spec {spec!r}: no weight files (.safetensors/.bin) in {folder}")
    return LoadedPi0(model=model, tokenizer=_checkpoint_tokenizer(folder), identity=identity)


def _checkpoint_folder(parsed: ModelSpec) -> Path:
    if parsed.source == "dir":
        return Path(parsed.ref).expanduser()
    from huggingface_hub import snapshot_download

    # snapshot_download honours HF_HUB_OFFLINE and the hub cache; it returns the local snapshot.
    return Path(snapshot_download(parsed.ref, revision=parsed.revision))


def _checkpoint_tokenizer(folder: Path) -> Any | None:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((folder / name).is_file() for name in names):
        log.info("π0 checkpoint %s has no tokenizer files: using the byte-level tokenizer", folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(table)}")
    return table[name]


def _json_safe(obj: Any) -> Any:
    """Config dicts can hold tuples and dtypes; make them plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------- parameters
class Pi0TargetParams(StrictModel):
    """Every parameter that changes a pi0 target version (all of it is hashed into the id)."""

    pairs: int = Field(default=4, ge=0, description="K: fixed (t, noise-seed) pairs per sample (0: inputs only, "
                                                    "for online distillation).")
    attn_layers: list[int] = Field(
        default_factory=list,
        description="Teacher layers whose action->VL attention is stored (empty: no attention array).")
    attn_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="Storage dtype of the head-averaged attention maps.")
    cameras: list[str] = Field(description="Cameras whose first-frame images form the observation.")
    state_key: str = Field(default="state", description="Low-dim column holding the robot state.")
    action_key: str = Field(default="action", description="Low-dim column holding the actions.")
    state_indices: list[int] | None = Field(
        default=None, description="Elements of the state kept (needed when it is longer than 32).")
    normalization: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="{'state'|'action': {'mean': [...], 'std': [...]}}; empty means raw values.")
    max_text_tokens: int = Field(default=48, ge=2, description="Instruction tokens (bos + text + newline), padded.")
    tokenizer: Literal["bytes", "checkpoint"] = Field(description="Which tokenizer produced the ids.")
    image_size: int = Field(description="Side of the square images fed to SigLIP (stored at this size).")
    dtype: str = Field(default="float32", description="Teacher compute dtype (float32, bfloat16, float16).")
    chunk_size: int = Field(default=50, description="Actions per chunk.")
    max_dim: int = Field(default=32, description="State and action dims are zero-padded to this.")


def default_attn_layers(teacher_layers: int, student_layers: int = 6) -> list[int]:
    """Teacher layers matched to the middle layers of a uniformly subsampled student.

    18 teacher layers and a 6-layer student give the map [0, 3, 7, 10, 14, 17]; its middle
    layers [3, 7, 10, 14] are the ones Shallow-π distils attention at (not first/last).
    """
    mapping = uniform_layer_map(teacher_layers, min(student_layers, teacher_layers))
    return mapping[1:-1]


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Shallow-π's uniform subsampling: ``round(linspace(0, L_T - 1, L_S))``."""
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student layers {student_layers}: must be between 1 and the teacher's {teacher_layers}")
    mapping = [int(i) for i in np.round(np.linspace(0, teacher_layers - 1, student_layers))]
    assert len(set(mapping)) == len(mapping), mapping
    return mapping


def prefix_length(config: Any, num_cameras: int, max_text_tokens: int) -> int:
    """P: vision-language keys per sample (image tokens of every camera + padded text tokens)."""
    return num_cameras * tokens_per_image(config) + max_text_tokens


# ----------------------------------------------------------------------------- samples
def tokenize_instruction(text: str, tokenizer: Any | None, max_tokens: int,
                         suffix: str = "\n") -> tuple[np.ndarray, np.ndarray]:
    """Prompt -> (ids (L,) int32, mask (L,) uint8) as PI0Processor lays it out: bos + text + ``suffix``.

    Right-padded to ``max_tokens``; longer instructions are truncated (logged).
    """
    if tokenizer is None:
        ids = [BYTE_BOS_ID] + [BYTE_TOKEN_OFFSET + b for b in (text + suffix).encode("utf-8")]
        pad_id = BYTE_PAD_ID
    else:
        ids = tokenizer((tokenizer.bos_token or "") + text + suffix, add_special_tokens=False)["input_ids"]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if len(ids) > max_tokens:
        log.warning("instruction %r: %d tokens, truncated to %d", text[:40], len(ids), max_tokens)
        ids = ids[:max_tokens]
    ids_L = np.full(max_tokens, pad_id, dtype=np.int32)
    mask_L = np.zeros(max_tokens, dtype=np.uint8)
    ids_L[: len(ids)] = ids
    mask_L[: len(ids)] = 1
    return ids_L, mask_L


def pi05_prompt(instruction: str, state: np.ndarray) -> str:
    """π0.5's prompt (PI05Processor.build_prompts, after bos): the task, then the normalised state
    discretised into 256 bins over [-1, 1]."""
    bins = np.linspace(-1, 1, 256 + 1)[:-1]
    discrete = np.searchsorted(bins, np.asarray(state, dtype=np.float32), side="right") - 1
    task = instruction.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {task}, State: {' '.join(str(int(b)) for b in discrete)};\nAction: "


def resize_images(frames_NHWC: np.ndarray, size: int) -> np.ndarray:
    """uint8 camera images (N, H, W, 3) -> (N, size, size, 3) uint8, bicubic with antialiasing."""
    if frames_NHWC.ndim != 4 or frames_NHWC.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3) uint8, got shape {frames_NHWC.shape}")
    if frames_NHWC.shape[1:3] == (size, size):
        return np.ascontiguousarray(frames_NHWC, dtype=np.uint8)
    x_NCHW = torch.from_numpy(np.ascontiguousarray(frames_NHWC)).permute(0, 3, 1, 2).float()
    y_NCHW = F.interpolate(x_NCHW, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y_NCHW.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def prepare_vector(values: np.ndarray, stats: dict[str, list[float]] | None, width: int, what: str) -> np.ndarray:
    """Normalise (mean/std), round to float16 precision and zero-pad the last axis to ``width``.

    The rounding makes the float32 values exactly representable in float16, so the teacher's
    inputs survive an ``f16`` export bit for bit and the student sees the very x_t the teacher saw.
    ValueError when the vector is too wide or outside float16's range.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] > width:
        raise ValueError(f"{what}: {values.shape[-1]} elements, more than π0's {width}; select fewer")
    if stats:
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        if mean.shape[-1] != values.shape[-1]:
            raise ValueError(f"{what}: statistics have {mean.shape[-1]} elements, values {values.shape[-1]}")
        values = (values - mean) / (std + 1e-8)
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > np.finfo(np.float16).max:
        raise ValueError(f"{what}: values are not finite or exceed the float16 range")
    pad = [(0, 0)] * (values.ndim - 1) + [(0, width - values.shape[-1])]
    return np.pad(values, pad).astype(np.float16).astype(np.float32)


def assemble_sample(images_NHWC: np.ndarray, instruction: str, state: np.ndarray, actions_TD: np.ndarray,
                    params: Pi0TargetParams, tokenizer: Any | None, family: str = "pi0") -> dict[str, np.ndarray]:
    """One training sample from raw observation data.

    ``images_NHWC``: the observation frame of each camera (uint8); ``state``: the raw state vector
    at the observation frame; ``actions_TD``: the raw actions from the observation frame on (at
    most ``chunk_size`` rows; a shorter tail at the episode end is padded by repeating the last
    action and masked out). Returns the arrays stored per sample in a pi0 version.
    """
    if len(actions_TD) == 0:
        raise ValueError("actions: empty action chunk")
    state = np.asarray(state)
    if params.state_indices is not None:
        state = state[..., params.state_indices]
    chunk = actions_TD[: params.chunk_size]
    valid = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], params.chunk_size - valid, axis=0)])
    actions_AD = prepare_vector(chunk, params.normalization.get("action"), params.max_dim, "actions")
    action_mask_AD = np.zeros((params.chunk_size, params.max_dim), dtype=np.uint8)
    action_mask_AD[:valid, : chunk.shape[-1]] = 1
    state_D = prepare_vector(state, params.normalization.get("state"), params.max_dim, "state")
    if family == "pi05":  # the state is read from the prompt (the model has no state input)
        prompt = pi05_prompt(instruction, state_D[: state.shape[-1]])
        text_ids, text_mask = tokenize_instruction(prompt, tokenizer, params.max_text_tokens, suffix="")
    else:
        text_ids, text_mask = tokenize_instruction(instruction, tokenizer, params.max_text_tokens)
    return {
        "images": resize_images(images_NHWC, params.image_size),
        "text_ids": text_ids,
        "text_mask": text_mask,
        "state": state_D,
        "actions": actions_AD,
        "action_mask": action_mask_AD,
    }


def stack_samples(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """List of per-sample dicts -> dict of (B, ...) arrays."""
    return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


# ----------------------------------------------------------------------------- (t, noise) pairs
def sample_seed(version_id: str, sample_id: str) -> int:
    """63-bit seed derived from (version id, sample id): stable across machines and reruns."""
    digest = hashlib.sha256(f"{version_id}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def beta_times(rng: np.random.Generator, count: int, alpha: float = 1.5, beta: float = 1.0) -> np.ndarray:
    """Flow-matching times ``Beta(alpha, beta) * 0.999 + 0.001`` as float32."""
    return (rng.beta(alpha, beta, size=count) * 0.999 + 0.001).astype(np.float32)


def fixed_pairs(version_id: str, sample_id: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """K fixed (t, noise-seed) pairs of one sample: t (K,) float32 and noise seeds (K,) int64.

    The sample's seed (from version id and sample id) draws the K noise seeds; each pair's t is
    drawn from its own noise seed (:func:`pair_times`), so a pair is recovered exactly from the
    integer seed alone, whatever float codec an export later applies to the stored ``t``.
    """
    rng = np.random.default_rng(sample_seed(version_id, sample_id))
    seeds = rng.integers(0, 2**62, size=count, dtype=np.int64)
    return pair_times(seeds), seeds


def pair_times(noise_seeds: np.ndarray) -> np.ndarray:
    """t of each (t, noise-seed) pair: one Beta(1.5, 1) draw from the pair's seed (float32)."""
    seeds = np.asarray(noise_seeds, dtype=np.int64)
    flat = [beta_times(np.random.default_rng(int(seed)), 1)[0] for seed in seeds.reshape(-1)]
    return np.asarray(flat, dtype=np.float32).reshape(seeds.shape)


def noise_from_seeds(seeds: np.ndarray, chunk: int = 50, dim: int = 32) -> torch.Tensor:
    """Gaussian noise (len(seeds), chunk, dim) float32, each drawn on the CPU from its own seed.

    CPU generation makes the noise identical on every device, so only seeds need storing.
    """
    out = torch.empty(len(seeds), chunk, dim)
    for i, seed in enumerate(np.asarray(seeds).reshape(-1)):
        generator = torch.Generator().manual_seed(int(seed))
        out[i] = torch.randn(chunk, dim, generator=generator)
    return out


# ----------------------------------------------------------------------------- model inputs
@dataclass
class Pi0Batch:
    """Model-ready tensors of B samples (one device, the model's dtype for pixels)."""

    pixel_values: torch.Tensor  # (B, N_cams, 3, S, S)
    pixel_attention_mask: torch.Tensor  # (B, N_cams) bool
    input_ids: torch.Tensor  # (B, P) image tokens then text tokens
    attention_mask: torch.Tensor  # (B, P) 1 = real token
    state: torch.Tensor  # (B, 32)
    actions: torch.Tensor  # (B, 50, 32)
    action_mask: torch.Tensor  # (B, 50, 32) bool

    @property
    def prefix_len(self) -> int:
        return int(self.input_ids.shape[1])


def pixel_values_from_uint8(images_BNHWC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, N, H, W, 3) -> normalised (B, N, 3, H, W) in [-1, 1] (PI0ImageProcessor's mean/std)."""
    x = images_BNHWC.permute(0, 1, 4, 2, 3).float() / 255.0
    return ((x - IMAGE_MEAN) / IMAGE_STD).to(dtype)


def make_batch(arrays: dict[str, Any], config: Any, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Pi0Batch:
    """Stacked sample arrays (images, text_ids, text_mask, state, actions, action_mask) -> Pi0Batch.

    ``images`` may be a uint8 tensor already augmented; everything else numpy or tensors.
    """
    images = torch.as_tensor(arrays["images"]).to(device)
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8, got {images.dtype}")
    batch_size, num_cameras = images.shape[:2]
    text_ids = torch.as_tensor(arrays["text_ids"]).to(device=device, dtype=torch.long)
    text_mask = torch.as_tensor(arrays["text_mask"]).to(device=device, dtype=torch.long)
    num_image_tokens = num_cameras * tokens_per_image(config)
    image_ids = torch.full((batch_size, num_image_tokens), config.vlm_config.image_token_id,
                           dtype=torch.long, device=device)
    return Pi0Batch(
        pixel_values=pixel_values_from_uint8(images, dtype),
        pixel_attention_mask=torch.ones(batch_size, num_cameras, dtype=torch.bool, device=device),
        input_ids=torch.cat([image_ids, text_ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(image_ids), text_mask], dim=1),
        state=torch.as_tensor(arrays["state"]).to(device=device, dtype=dtype),
        actions=torch.as_tensor(arrays["actions"]).to(device=device, dtype=dtype),
        action_mask=torch.as_tensor(arrays["action_mask"]).to(device=device).bool(),
    )


# ----------------------------------------------------------------------------- forward passes
def use_eager_expert(model: Any) -> None:
    """Switch the action expert to eager attention (cheap: 51 queries).

    Attention weights come only from eager attention, and targets and training always use it,
    so a velocity never depends on whether attention maps were requested alongside it.
    """
    model = unwrap(model)
    if model.config.dit_config._attn_implementation != "eager":
        model.set_attn_implementation({"dit_config": "eager"})


def state_input(model: Any, batch: Pi0Batch) -> dict[str, torch.Tensor]:
    """The state as the model takes it: π0's ``state`` argument; nothing for π0.5 (it is in the prompt)."""
    return {} if model_family(model) == "pi05" else {"state": batch.state}


def unwrap(model: Any) -> Any:
    """The π0 model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


ATTN_HEADS = ("mean", "all")
"""How action->VL attention maps keep the heads: averaged (what the pi0 cache stores) or each head."""


def action_vl_attention(attentions: tuple[torch.Tensor, ...], layers: list[int], prefix_len: int,
                        chunk: int, heads: str = "mean") -> torch.Tensor:
    """Attention of the action queries over the vision-language keys, heads averaged or kept.

    ``attentions[l]``: expert layer l's weights (B, H, [1 +] chunk, P + [1 +] chunk) over
    [prefix | (π0: state) | actions]. Each head's distribution is restricted to the P prefix keys
    and renormalised (Shallow-π distils the action->VL distribution only). Returns float32
    (B, len(layers), chunk, P) with ``heads="mean"``, (B, len(layers), H, chunk, P) with ``"all"``;
    padded text keys carry zero mass.
    """
    if heads not in ATTN_HEADS:
        raise ValueError(f"attention heads {heads!r}: expected one of {ATTN_HEADS}")
    maps = []
    for layer in layers:
        weights_BHQK = attentions[layer][:, :, -chunk:, :prefix_len].float()
        weights_BHQK = weights_BHQK / weights_BHQK.sum(-1, keepdim=True).clamp_min(1e-30)
        maps.append(weights_BHQK.mean(dim=1) if heads == "mean" else weights_BHQK)
    return torch.stack(maps, dim=1)


def pi0_forward(model: Any, batch: Pi0Batch, t_B: torch.Tensor, noise_BAD: torch.Tensor,
                attn_layers: list[int], heads: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """One full forward (prefix + expert) at (x_t, t); differentiable. Used for the student.

    Returns the velocity (B, 50, 32) in the model's dtype and, when ``attn_layers`` is not empty,
    the action->VL attention (B, len(attn_layers), [H,] 50, P) float32 (see action_vl_attention).
    """
    use_eager_expert(model)
    out = model(**state_input(model, batch), noise=noise_BAD.to(batch.actions), timestep=t_B.float(),
                input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                pixel_attention_mask=batch.pixel_attention_mask, attention_mask=batch.attention_mask,
                actions=batch.actions, output_attentions=bool(attn_layers))
    attn = None
    if attn_layers:
        attn = action_vl_attention(out.attentions, attn_layers, batch.prefix_len, unwrap(model).config.chunk_size,
                                   heads)
    return out.logits, attn


def prefix_cache(model: Any, batch: Pi0Batch) -> Any:
    """Run the VLM once over the prefix and return its key/value cache (as PI0Model.forward does)."""
    inputs_embeds = model.model.embed_prefix(batch.input_ids, batch.pixel_values, batch.pixel_attention_mask)
    out = model.model.vlm(
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.attention_mask.cumsum(-1) - 1,
        token_type_ids=torch.zeros_like(inputs_embeds)[:, :, 0],
        use_cache=True,
    )
    # transformers renamed the output and argument `past_key_values` to `cache` (5.2x); accept both.
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def cache_kwarg(model: Any) -> str:
    """The name under which this transformers version's π0 forward takes a prefix cache."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


@torch.no_grad()
def teacher_targets(model: Any, batch: Pi0Batch, t_BK: torch.Tensor, noise_BKAD: torch.Tensor,
                    attn_layers: list[int], heads: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher velocity and attention at K fixed (t, noise) pairs per sample.

    The prefix is run once and its cache reused for the K expert passes (cropped back after
    each, so no pass sees another's suffix). Returns velocity (B, K, 50, 32) float32 and
    attention (B, K, L_sel, [H,] 50, P) float32, or None when ``attn_layers`` is empty.
    """
    use_eager_expert(model)
    cache = prefix_cache(model, batch)
    velocities, maps = [], []
    for k in range(t_BK.shape[1]):
        out = model(**state_input(model, batch), noise=noise_BKAD[:, k].to(batch.actions), timestep=t_BK[:, k].float(),
                    attention_mask=batch.attention_mask, pixel_attention_mask=batch.pixel_attention_mask,
                    actions=batch.actions, output_attentions=bool(attn_layers), **{cache_kwarg(model): cache})
        cache.crop(batch.prefix_len - cache.get_seq_length())
        velocities.append(out.logits.float())
        if attn_layers:
            maps.append(action_vl_attention(out.attentions, attn_layers, batch.prefix_len, model.config.chunk_size,
                                            heads))
    attn = torch.stack(maps, dim=1) if attn_layers else None
    return torch.stack(velocities, dim=1), attn


def compute_targets(model: Any, samples: dict[str, np.ndarray], sample_ids: list[str], version_id: str,
                    params: Pi0TargetParams, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """The stored arrays of a batch of samples: the sample arrays plus, for K > 0 pairs,
    t, noise_seed, velocity and (with attention layers) attn and attn_layers."""
    if params.pairs == 0:
        return dict(samples)  # inputs only: what online distillation reads
    pairs = [fixed_pairs(version_id, sample_id, params.pairs) for sample_id in sample_ids]
    t_BK = np.stack([p[0] for p in pairs])
    seeds_BK = np.stack([p[1] for p in pairs])
    if getattr(model, "is_null", False):
        return null_targets(model, samples, t_BK, seeds_BK, params)
    dtype = next(model.parameters()).dtype
    batch = make_batch(samples, model.config, device, dtype)
    noise_BKAD = noise_from_seeds(seeds_BK.reshape(-1), params.chunk_size, params.max_dim)
    noise_BKAD = noise_BKAD.view(len(sample_ids), params.pairs, params.chunk_size, params.max_dim)
    velocity, attn = teacher_targets(model, batch, torch.from_numpy(t_BK).to(device),
                                     noise_BKAD.to(device), params.attn_layers)
    arrays = {**samples, "t": t_BK, "noise_seed": seeds_BK, "velocity": velocity.cpu().numpy()}
    if attn is not None:
        arrays["attn"] = attn.cpu().numpy().astype(params.attn_dtype)
        # Per sample, so an export of this version says which teacher layers "attn" holds.
        arrays["attn_layers"] = np.tile(np.asarray(params.attn_layers, dtype=np.int16), (len(sample_ids), 1))
    return arrays


def null_targets(model: Any, samples: dict[str, np.ndarray], t_BK: np.ndarray, seeds_BK: np.ndarray,
                 params: Pi0TargetParams) -> dict[str, np.ndarray]:
    """What :func:`compute_targets` stores, from the null model (pipelines/null_models.py)."""
    from foresight.pipelines.null_models import null_pi0_outputs

    prefix_len = prefix_length(model.config, len(params.cameras), params.max_text_tokens)
    velocity, attn = null_pi0_outputs(seeds_BK, params.chunk_size, params.max_dim, params.attn_layers, prefix_len,
                                      params.attn_dtype)
    arrays = {**samples, "t": t_BK, "noise_seed": seeds_BK, "velocity": velocity}
    if attn is not None:
        arrays["attn"] = attn
        arrays["attn_layers"] = np.tile(np.asarray(params.attn_layers, dtype=np.int16), (len(seeds_BK), 1))
    return arrays


def array_shapes(params: Pi0TargetParams, config: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-sample shape and dtype of every array a pi0 version stores (first dim N is added by callers)."""
    num_cameras, size = len(params.cameras), params.image_size
    chunk, dim, pairs = params.chunk_size, params.max_dim, params.pairs
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "images": ((num_cameras, size, size, 3), "uint8"),
        "text_ids": ((params.max_text_tokens,), "int32"),
        "text_mask": ((params.max_text_tokens,), "uint8"),
        "state": ((dim,), "float32"),
        "actions": ((chunk, dim), "float32"),
        "action_mask": ((chunk, dim), "uint8"),
    }
    if pairs == 0:
        return shapes
    shapes.update({"t": ((pairs,), "float32"), "noise_seed": ((pairs,), "int64"),
                   "velocity": ((pairs, chunk, dim), "float32")})
    if params.attn_layers:
        num_keys = prefix_length(config, num_cameras, params.max_text_tokens)
        shapes["attn"] = ((pairs, len(params.attn_layers), chunk, num_keys), params.attn_dtype)
        shapes["attn_layers"] = ((len(params.attn_layers),), "int16")
    return shapes
