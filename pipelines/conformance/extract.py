"""Group ``extract``: foresight's one-step SVD feature extraction against the released extractor.

The fixture (svam_tiny format, SPEC.md section 1) holds the release's inputs (text hidden
states, the [-1, 1] observed frame, the initial latent draw), its settings in ``config.json`` →
``extract`` and a tiny UNet/VAE under diffusers' parameter names. Everything here runs the
production code path of ``pipelines.svd`` (conditioning, scheduler, image latents, the UNet split
head, the feature merge) with the release's settings expressed as foresight settings
(:func:`release_params`); only the fixture's recorded random draws replace the seeded ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from foresight.pipelines.conformance import ArrayCheck, compare, group_arrays
from foresight.pipelines.svd import conditioning as cond
from foresight.pipelines.svd.loading import SVDModel, svd_from_state_dicts
from foresight.pipelines.svd.sampler import BatchInputs, condition, extractor_features, unet_sample
from foresight.pipelines.svd.unet_split import UNetHead, check_feature_blocks
from foresight.pipelines.text import TextModel, embed_texts, tokenize
from foresight.schemas.model import ModelIdentity
from foresight.schemas.svd import OneStepParams, SVDParams

GROUP = "extract"
REQUIRED = ("text_hidden", "pixel_values", "latents_randn", "features")

# (atol, rtol) per array, SPEC.md section 1; (0, 0) means exact.
TOLERANCES: dict[str, tuple[float, float]] = {
    "token_ids": (0.0, 0.0), "attention_mask": (0.0, 0.0), "added_time_ids": (0.0, 0.0),
    "text_hidden": (1e-5, 1e-5),  # not in SPEC.md (weights not shipped there): the time-embedding tolerance
    "sched_sigmas": (0.0, 1e-6), "sched_timesteps": (0.0, 1e-6), "t0": (0.0, 1e-6), "sigma0": (0.0, 1e-6),
    "init_noise_sigma": (0.0, 1e-6),
    "text_pe_table": (1e-6, 0.0), "text_enc_pe_on": (1e-6, 0.0),
    "latents_init": (1e-3, 0.0),
    "latents_scaled": (1e-5, 1e-5), "image_latents": (1e-5, 1e-5), "unet_input": (1e-5, 1e-5),
    "time_emb": (1e-5, 1e-5), "aug_emb": (1e-5, 1e-5),
    "mid_out": (1e-4, 1e-4),
    "features": (2e-4, 1e-4),
}


def applies(io: dict[str, np.ndarray]) -> bool:
    """True when the fixture holds the extract group's inputs and outputs."""
    return all(f"{GROUP}.{name}" in io for name in REQUIRED)


def release_params(settings: dict[str, Any]) -> SVDParams:
    """foresight's SVD settings equivalent to the release extractor's (``config.json`` → ``extract``).

    ``extract_layer_idx`` k with ``use_all_layer`` becomes feature blocks 0..k (each upsampled
    nearest to block k's grid and concatenated), without it block k alone; fps goes into the time
    ids as is; the noise augmentation is the release's (0, so the image gets no noise either)."""
    k = int(settings["extract_layer_idx"])
    blocks = list(range(k + 1)) if settings["use_all_layer"] else [k]
    onestep = OneStepParams(fps_id="fps", noise_aug_strength=float(settings["noise_aug_strength"]),
                            schedule_steps=int(settings["num_inference_steps"]))
    return SVDParams(num_frames=int(settings["num_frames"]), size=int(settings["pixel_hw"][0]),
                     fps=int(settings["fps"]), motion_bucket_id=int(settings["motion_bucket_id"]),
                     feature_blocks=blocks, text_position_encoding=bool(settings["position_encoding_main"]),
                     onestep=onestep)


def load_fixture_svd(fixture_dir: Path, settings: dict[str, Any]) -> SVDModel:
    """The fixture's tiny UNet and VAE (float16-exact weights, computed in float32)."""
    from safetensors.torch import load_file

    identity = ModelIdentity(spec=f"dir:{fixture_dir}", family="svd", source="dir", ref=str(fixture_dir))
    return svd_from_state_dicts(identity, settings["unet_config"], settings["vae_config"],
                                settings["scheduler_config"], load_file(str(fixture_dir / "model_unet.safetensors")),
                                load_file(str(fixture_dir / "model_vae.safetensors")))


def fixture_tokenizer(text_config: dict[str, Any], prompts: list[dict[str, Any]]):
    """A CLIP tokenizer whose vocabulary maps each word of the fixture's prompts to its recorded
    content id (merges build each word from its characters; the intermediate symbols get ids past
    the tiny vocabulary and never come out), with the fixture's BOS/EOS/PAD ids. What it checks is
    foresight's tokeniser call (padding, truncation, specials, mask), not CLIP's vocabulary."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": int(text_config["bos_token_id"]), "<|endoftext|>": int(text_config["eos_token_id"])}
    merges, symbols = [], []
    for prompt in prompts:
        words = prompt["text"].lower().split()
        if len(words) != len(prompt["content_ids"]):
            raise ValueError(f"config.json extract.prompts {prompt['text']!r}: {len(words)} words but "
                             f"{len(prompt['content_ids'])} content ids")
        for word, token_id in zip(words, prompt["content_ids"]):
            pieces = [*word[:-1], word[-1] + "</w>"]
            symbols += pieces
            for piece in pieces[1:]:
                merges.append((pieces[0], piece))
                pieces[0] += piece
                symbols.append(pieces[0])
            vocab[pieces[0]] = int(token_id)
    next_id = int(text_config["vocab_size"])
    for symbol in symbols:
        if symbol not in vocab:
            vocab[symbol], next_id = next_id, next_id + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def tokens(settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """``token_ids`` and ``attention_mask`` of the fixture's prompts through foresight's tokeniser call."""
    tokenizer = fixture_tokenizer(settings["text_encoder_config"], settings["prompts"])
    encoded = tokenize(tokenizer, [prompt["text"] for prompt in settings["prompts"]], int(settings["max_length"]))
    return {"token_ids": encoded["input_ids"].numpy(), "attention_mask": encoded["attention_mask"].numpy()}


def text_encoder_weights(fixture_dir: Path, config: dict) -> Path | None:
    """The fixture's text-encoder weights when it ships them (``extract.text_encoder_weights_shipped``:
    the generator's ``--with-text-encoder-weights``), else None (``text_hidden`` is then an input)."""
    if not config[GROUP].get("text_encoder_weights_shipped"):
        return None
    names = [name for name in config.get("weights_files", {}) if "text" in name]
    if not names:
        raise ValueError(f"{fixture_dir / 'config.json'}: extract.text_encoder_weights_shipped is true but "
                         "weights_files names no text-encoder file")
    return fixture_dir / names[0]


def text_hidden(weights: Path, settings: dict[str, Any]) -> np.ndarray:
    """``last_hidden_state`` of the fixture's prompts through foresight's text path (tokeniser call
    and ``embed_texts``) with the fixture's CLIPTextModelWithProjection weights; the projection,
    which ``last_hidden_state`` does not use, is dropped."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = CLIPTextModel(CLIPTextConfig(**settings["text_encoder_config"]))
    state = {key: value for key, value in load_file(str(weights)).items() if not key.startswith("text_projection.")}
    if not any(key.startswith("text_model.") for key in encoder.state_dict()):
        # transformers 5 names CLIPTextModel's tensors without the prefix WithProjection keeps
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
    identity = ModelIdentity(spec=f"dir:{weights.parent}", family="clip-text", source="dir", ref=str(weights.parent))
    model = TextModel(tokenizer=fixture_tokenizer(settings["text_encoder_config"], settings["prompts"]),
                      encoder=encoder.float().eval(), identity=identity, device=torch.device("cpu"))
    return embed_texts(model, [prompt["text"] for prompt in settings["prompts"]], int(settings["max_length"]))


def fixture_inputs(arrays: dict[str, np.ndarray]) -> BatchInputs:
    """The release's recorded draws and inputs as foresight's batch inputs (no image noise drawn:
    the release adds none, and with strength 0 foresight's draw would be multiplied by 0)."""
    pixels_BFCHW = torch.from_numpy(arrays["pixel_values"])
    if pixels_BFCHW.shape[1] != 1:
        raise ValueError(f"extract.pixel_values: frame axis must have length 1, got {tuple(pixels_BFCHW.shape)}")
    images_BCHW = pixels_BFCHW[:, 0]
    return BatchInputs(noise_BTCHW=torch.from_numpy(arrays["latents_randn"]),
                       image_noise_BCHW=torch.zeros_like(images_BCHW), images_BCHW=images_BCHW,
                       text_BLD=arrays["text_hidden"])


@torch.no_grad()
def recompute(model: SVDModel, params: SVDParams, inputs: BatchInputs) -> dict[str, np.ndarray]:
    """Every ``extract.*`` array the release computes, recomputed by foresight's functions."""
    onestep = params.onestep
    assert onestep is not None
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(onestep.schedule_steps, device=model.device)
    c = condition(model, params, inputs, scheduler.init_noise_sigma, onestep.fps_id, onestep.noise_aug_strength)
    t0 = scheduler.timesteps[0]
    scaled = scheduler.scale_model_input(c.latents, t0)
    sample = unet_sample(model, scaled, c.image_latents)
    head = UNetHead(model.unet, check_feature_blocks(model.unet, params.feature_blocks))
    length, width = np.shape(inputs.text_BLD)[1:]
    out = {
        "sched_sigmas": scheduler.sigmas, "sched_timesteps": scheduler.timesteps, "t0": t0.reshape(1),
        "sigma0": scheduler.sigmas[:1], "init_noise_sigma": torch.tensor([float(scheduler.init_noise_sigma)]),
        "added_time_ids": c.time_ids, "latents_init": c.latents, "latents_scaled": scaled,
        "image_latents": c.image_latents[:, 0], "unet_input": sample,
        "text_pe_table": cond.sincos_positions(length, width),
        "text_enc_pe_on": cond.text_states(model, inputs.text_BLD, position_encoding=True),
        "time_emb": head.time_embedding(sample, t0),
        "aug_emb": head.aug_embedding(c.time_ids, sample.dtype),
    }
    mid: list[torch.Tensor] = []
    hook = model.unet.mid_block.register_forward_hook(lambda _m, _a, output: mid.append(output))
    try:
        features_BTHWC = extractor_features(model, params, inputs, dtype=torch.float32)
    finally:
        hook.remove()
    out["mid_out"] = mid[0]
    out["features"] = features_BTHWC.permute(0, 1, 4, 2, 3)  # the release's (B, T, C, h, w)
    return {name: value.float().cpu().numpy() for name, value in out.items()}


def check(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    """Compare every recomputed ``extract.*`` array the fixture holds at SPEC.md's tolerances."""
    arrays = group_arrays(io, GROUP)
    settings = config[GROUP]
    params = release_params(settings)
    got = {**tokens(settings), **recompute(load_fixture_svd(fixture_dir, settings), params, fixture_inputs(arrays))}
    weights = text_encoder_weights(fixture_dir, config)
    if weights is not None:
        got["text_hidden"] = text_hidden(weights, settings)
    return [compare(GROUP, name, got[name], arrays[name], *TOLERANCES[name])
            for name in TOLERANCES if name in arrays and (name in got or name != "text_hidden")]
