"""LLaVA's vision side: the tower and projector, and how image features enter a prompt.

The language model of a LLaVA checkpoint is served by the engine like any causal LM; what makes
it LLaVA lives here. As in the original, the prompt is tokenized in chunks around each `<image>`
and every image occupies one placeholder id (-200) that becomes the image's features (one
position per patch) when the prompt is embedded. The engine then reads the prompt as embeddings.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from shared.protocol import IMAGE_TOKEN, check_image_count
from workers.images import load_pixel_values

IMAGE_TOKEN_INDEX = -200
IM_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """The original's projector for `mm_projector_type`: linear, mlpNx_gelu or identity.

    Its parameter names are the original's (`weight`/`bias`, or `0.`, `2.`, ... in the MLP), so
    `model.mm_projector.*` weights load into it once the prefix is dropped.
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match:
        layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, int(match.group(1))):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        return nn.Sequential(*layers)
    if projector_type == "identity":
        return nn.Identity()
    raise ValueError(f"unknown mm_projector_type {projector_type!r} (expected linear, mlpNx_gelu or identity)")


class VisionEncoder(nn.Module):
    """Pixel values [N, 3, S, S] → image features [N, P, hidden]: tower, feature selection, projector.

    `select_layer` indexes the tower's hidden states (-2: the penultimate layer; a list concatenates
    several, as llava-hf allows); `select_feature` "patch" drops the CLS position, "cls_patch" keeps it.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, select_layer: int | list[int], select_feature: str):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unknown mm_vision_select_feature {select_feature!r} (expected patch or cls_patch)")
        self.tower = tower
        self.projector = projector
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def tokens_per_image(self) -> int:
        """Positions one image takes in the prompt: the tower's output positions, less the first for "patch".

        As `forward` (and transformers' llava) computes them: a CLIP tower outputs CLS and
        (image_size / patch_size)² patches (576 for CLIP-L/336), a SigLIP tower (llava-interleave) patches alone,
        so SigLIP gives one position fewer; counting CLIP's CLS for it shifted the prompt by one position.
        """
        tower = getattr(self.tower, "vision_model", self.tower)  # CLIPVisionModel may wrap its transformer
        positions = getattr(getattr(tower, "embeddings", None), "num_positions", None)
        if positions is None:  # a tower of another kind: CLIP's layout
            config = self.tower.config
            positions = (config.image_size // config.patch_size) ** 2 + 1
        return positions - (1 if self.select_feature == "patch" else 0)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        parameter = next(self.tower.parameters())
        outputs = self.tower(pixel_values.to(device=parameter.device, dtype=parameter.dtype),
                             output_hidden_states=True)
        layers = self.select_layer if isinstance(self.select_layer, list) else [self.select_layer]
        features = torch.cat([outputs.hidden_states[layer] for layer in layers], dim=-1)
        if self.select_feature == "patch":
            features = features[:, 1:]
        return self.projector(features)


@dataclass
class LlavaVision:
    """What a worker needs to read images for its LLaVA model.

    `image_aspect_ratio` is the checkpoint's ("pad", or None for the processor alone); with
    `use_im_start_end` every `<image>` is wrapped in `<im_start>` / `<im_end>` before tokenizing.
    `follows_transformers` (llava-hf) makes transformers' llava the
    reference instead of the original: its image processor alone prepares an image (its `do_pad` says pad or crop;
    transformers reads no `image_aspect_ratio`, so one left in the config is dropped), and transparency goes to
    it as it is (it composites it onto white; the original's transformers, 4.37, dropped alpha).
    """

    encoder: VisionEncoder
    image_processor: object
    image_aspect_ratio: str | None = None
    use_im_start_end: bool = False
    follows_transformers: bool = False
    # One vision forward at a time: it bounds the activation memory of many concurrent requests and
    # keeps task threads from oversubscribing the CPU; decoding and preprocessing stay parallel.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tokens_per_image(self) -> int:
        return self.encoder.tokens_per_image

    def check_image_count(self, prompt: str, num_images: int) -> None:
        """The original's rule: one image per `<image>` of the prompt; ValueError (its message) otherwise. The API
        checks rendered chat turns by the same rule when they are submitted."""
        check_image_count(prompt, num_images)

    def pixel_values(self, images: list[str], process_mode: str | None = None) -> torch.Tensor:
        """Decode and prepare a request's base64 images → [N, 3, S, S]; ValueError naming a bad image."""
        return load_pixel_values(images, self.image_processor, self.image_aspect_ratio, process_mode,
                                 keep_alpha=self.follows_transformers)

    def tokenize(self, prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids of the prompt as the model reads it, one IMAGE_TOKEN_INDEX per image (the original's tokenization)."""
        if self.use_im_start_end:
            prompt = prompt.replace(IMAGE_TOKEN, IM_START_TOKEN + IMAGE_TOKEN + IM_END_TOKEN)
        return tokenize_with_images(prompt, tokenizer)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features [N, P, hidden] of pixel values [N, 3, S, S] (thread-safe)."""
        with self._lock:
            return self.encoder(pixel_values)


def tokenize_with_images(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The original's `tokenizer_image_token`: ids of `prompt` with IMAGE_TOKEN_INDEX where each `<image>` was.

    Each text chunk between `<image>`s is tokenized on its own (so the `<image>` text never reaches
    the tokenizer); when the tokenizer starts a chunk with BOS, the result starts with one BOS and
    every chunk loses its own.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:offset]
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


@torch.inference_mode()
def embed_prompt(ids: list[int], image_features: torch.Tensor, embed_tokens: nn.Module) -> torch.Tensor:
    """Prompt embeddings [T, hidden]: text ids embedded, each IMAGE_TOKEN_INDEX replaced by the next image's features.

    `ids` holds one placeholder per image (`tokenize_with_images`); T is the number of text ids
    plus every image's feature positions.
    """
    weight = embed_tokens.weight
    placeholders = [index for index, token in enumerate(ids) if token == IMAGE_TOKEN_INDEX]
    if len(placeholders) != len(image_features):
        raise ValueError(f"{len(image_features)} images given for {len(placeholders)} image positions in the prompt")
    pieces, start = [], 0
    for image, position in enumerate([*placeholders, len(ids)]):
        if position > start:
            pieces.append(embed_tokens(torch.tensor(ids[start:position], device=weight.device)))
        if image < len(image_features):
            pieces.append(image_features[image].to(device=weight.device, dtype=weight.dtype))
        start = position + 1
    return torch.cat(pieces)


@torch.inference_mode()
def extend_prompt_embeds(prompt_embeds: torch.Tensor, ids: list[int], embed_tokens: nn.Module) -> torch.Tensor:
    """`prompt_embeds` [T, hidden] followed by the embeddings of text `ids` (a resumed job's earlier output)."""
    if not ids:
        return prompt_embeds
    weight = embed_tokens.weight
    more = embed_tokens(torch.tensor(ids, device=weight.device)).to(prompt_embeds.dtype)
    return torch.cat([prompt_embeds, more.to(prompt_embeds.device)])
