"""CLIP text embeddings of instructions (VPP/S-VAM: ``last_hidden_state`` at max_length 20).

Model specs: ``hf:``/``dir:`` load a CLIP text encoder and its tokenizer (either a CLIP repo's
root or ``text_encoder/`` + ``tokenizer/`` subfolders, as in a diffusers-style folder);
``random`` is the CLIP ViT-B/32 text tower (512 wide, 12 layers) with random weights; ``tiny`` a
16-wide, 2-layer one. Both random kinds use CLIP's byte-level base vocabulary without merges
(every byte a token), which needs no downloaded vocabulary file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from foresight.pipelines.svd.loading import real_identity, resolve_folder
from foresight.schemas.model import ModelIdentity, ModelSpec
from foresight.schemas.svd import MAX_LENGTH  # the CLIP token count, kept where the configs read it

log = logging.getLogger(__name__)

FAMILY = "clip-text"
DEFAULT_SEED = 0
START, END = "<|startoftext|>", "<|endoftext|>"
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "max_position_embeddings": 32, "projection_dim": 16,
}
HF_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.bin", "text_encoder/*", "tokenizer/*"]


@dataclass
class TextModel:
    """A CLIP text encoder, its tokenizer and the identity a manifest records."""

    tokenizer: CLIPTokenizer
    encoder: CLIPTextModel
    identity: ModelIdentity
    device: torch.device

    @property
    def width(self) -> int:
        """Width D of the hidden states (512 for CLIP ViT-B/32)."""
        return int(self.encoder.config.hidden_size)


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's printable stand-in for each of the 256 bytes, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def byte_level_tokenizer() -> CLIPTokenizer:
    """CLIP's base vocabulary (256 byte symbols, the same with '</w>', then the two specials) and
    no merges: a real CLIP tokenizer whose tokens are single bytes."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], bos_token=START, eos_token=END, pad_token=END, unk_token=END)


def _random_config(source: str) -> dict[str, Any]:
    base = dict(TINY_TEXT_CONFIG) if source == "tiny" else {}
    # Specials at the end of the byte vocabulary (ids 512, 513) as in CLIP's own ordering.
    vocab = {"vocab_size": 514} if source == "tiny" else {}
    return {**base, **vocab, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}


def _build_random(source: str, seed: int) -> tuple[CLIPTokenizer, CLIPTextModel, ModelIdentity]:
    config = _random_config(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(CLIPTextConfig(**config))
    identity = ModelIdentity(spec=source, family=FAMILY, source=source, seed=seed,
                             config={"text": config, "tokenizer": "clip-byte-level-no-merges"})
    return byte_level_tokenizer(), encoder, identity


def _load_real(spec: ModelSpec) -> tuple[CLIPTokenizer, CLIPTextModel, ModelIdentity]:
    folder = resolve_folder(spec, allow_patterns=HF_PATTERNS)
    nested = (folder / "text_encoder").is_dir()
    model_dir = folder / "text_encoder" if nested else folder
    tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        encoder = CLIPTextModel.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"model spec {spec}: cannot load a CLIP text model from {folder} ({err})") from None
    identity = real_identity(spec, folder, ("text_encoder",) if nested else ("",), FAMILY)
    return tokenizer, encoder, identity


def load_text_model(spec: str | ModelSpec, device: str | torch.device = "cpu", seed: int = DEFAULT_SEED) -> TextModel:
    """Load the CLIP text encoder named by ``spec`` (float32, eval mode) onto ``device``."""
    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.source == "null":
        from foresight.pipelines.null_models import null_text_model

        return null_text_model(device)
    if spec.source in ("random", "tiny"):
        tokenizer, encoder, identity = _build_random(spec.source, seed)
    else:
        tokenizer, encoder, identity = _load_real(spec)
    device = torch.device(device)
    encoder = encoder.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    log.info("loaded CLIP text %s (width %d)", identity.spec, encoder.config.hidden_size)
    return TextModel(tokenizer=tokenizer, encoder=encoder, identity=identity, device=device)


def save_text_model(model: TextModel, folder: str | Path) -> Path:
    """Write the encoder and tokenizer as ``text_encoder/`` and ``tokenizer/`` (readable via ``dir:``)."""
    folder = Path(folder)
    model.encoder.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def tokenize(tokenizer: CLIPTokenizer, texts: list[str], max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (N, max_length) as VPP/S-VAM tokenise: [BOS, content,
    EOS, PAD...], padded to ``max_length`` and truncated, mask 1 on BOS/content/EOS."""
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


@torch.no_grad()
def embed_texts(model: TextModel, texts: list[str], max_length: int = MAX_LENGTH, batch: int = 64) -> np.ndarray:
    """``last_hidden_state`` of each text, padded/truncated to ``max_length`` tokens: (N, L, D) float32."""
    if model.identity.is_null:
        from foresight.pipelines.null_models import null_text_states

        return null_text_states(texts, max_length, model.width)
    out = []
    for first in range(0, len(texts), batch):
        tokens = {key: value.to(model.device)
                  for key, value in tokenize(model.tokenizer, texts[first:first + batch], max_length).items()}
        states = model.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        out.append(states.float().cpu().numpy())
    if not out:
        return np.zeros((0, max_length, model.width), dtype=np.float32)
    return np.concatenate(out)


def embed_instructions(model: TextModel, instructions: list[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Per-clip states (N, L, D) float32, running the encoder once per distinct instruction."""
    states_ULD, row_N = embed_distinct(model, instructions, max_length)
    return states_ULD[row_N] if instructions else states_ULD


def embed_distinct(model: TextModel, instructions: list[str],
                   max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """States of each distinct instruction (U, L, D) float32 and, per instruction given, its row
    there (N,) int64: what a stage keeps instead of N copies (a clip's states are L x D x 4 bytes,
    236 KB for CLIP-L; a collection has a few thousand distinct instructions for millions of clips)."""
    distinct = sorted(set(instructions))
    states_ULD = embed_texts(model, distinct, max_length)
    row_of = {text: row for row, text in enumerate(distinct)}
    return states_ULD, np.array([row_of[text] for text in instructions], dtype=np.int64)
