"""Image editing (paper §4.5): an instruction and an input image -> the edited image.

Each row is prefilled as `BOS instruction BOI input EOI BOI`, the input image clean (t = 0), as the edit
documents of training give it (data/edits.py); the output image is then diffused against that cached prefix
with the config's sampler by decoding.Decoder, exactly as text -> image is. With classifier-free guidance
(cfg_scale != 1) every row has an unconditional twin that drops the instruction but keeps the input image,

    conditional:    BOS instruction BOI input EOI BOI  -> output
    unconditional:  BOS BOI input EOI BOI               -> output

the instruction-dropped documents of training. Guidance thus amplifies what the instruction changes while both
predictions see the same input (a twin without the input would push the output away from the input itself).
Batched over inputs, each with its own instruction: rows are left-padded into one KV cache (Decoder.prefill).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from transfusion.codec import Codec, clip_for, decode_images, encode_images
from transfusion.decoding import Decoder, GenerationError, Segment, TokenizerLike, check_fits
from transfusion.diffusion.flow import FlowSchedule
from transfusion.diffusion.samplers import build_sampler
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.images import unpatchify
from transfusion.model.transfusion import Transfusion


def edit_rows(tokenizer: TokenizerLike, instructions: list[list[int]], inputs: Tensor,
              guided: bool) -> list[list[Segment]]:
    """The prefill rows: one conditional row per (instruction ids, input (C, H, W)), then, when `guided`, one
    unconditional twin per input in the same order (the instruction dropped, the input kept)."""
    tk = tokenizer
    cond = [[[tk.bos_id, *ids, tk.boi_id], image, [tk.eoi_id, tk.boi_id]] for ids, image in zip(instructions, inputs)]
    uncond = [[[tk.bos_id, tk.boi_id], image, [tk.eoi_id, tk.boi_id]] for image in inputs] if guided else []
    return cond + uncond


def edit_length(instruction_tokens: int, patches_per_image: int) -> int:
    """Positions decoding an edit needs: BOS instruction BOI input EOI BOI output."""
    return 4 + instruction_tokens + 2 * patches_per_image


def encode_instructions(model: Transfusion, tokenizer: TokenizerLike, instructions: list[str]) -> list[list[int]]:
    """Token ids per instruction; GenerationError for an empty one, or one too long for the model's context."""
    ids = []
    for text in instructions:
        if not text.strip():
            raise GenerationError('an empty edit instruction: say what to change, e.g. "make it red"')
        ids.append(tokenizer.encode(text.strip()))
    longest = max(len(x) for x in ids)
    check_fits(model, edit_length(longest, model.cfg.patches_per_image),
               f"an instruction of {longest} tokens with its input and output images")
    return ids


@torch.no_grad()
def edit_images(
    model: Transfusion, tokenizer: TokenizerLike, images: Tensor, instructions: list[str],
    schedule: NoiseSchedule | FlowSchedule, steps: int = 250, cfg_scale: float = 3.0, sampler: str = "ddpm",
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None, progress: bool = True,
    clip_x0: float | None = 1.0, codec: Codec | None = None,
) -> Tensor:
    """Edit images (N, C, H, W) in [-1, 1] by instructions[i] each -> (N, C, H, W) (pixels in and out through
    `codec` when given, codec.py). CFG runs the conditional
    rows and their unconditional twins in one batch; pass `**sampling_args(cfg.diffusion)` for the config's
    settings. `generator` may be a list, one per image: edit i then draws its noise from generator[i] alone, so
    it comes out the same edited alone or in any batch (up to rounding)."""
    c = model.cfg
    if len(images) == 0:
        raise GenerationError("no image to edit")
    images = encode_images(codec, images)
    if len(images) != len(instructions):
        raise GenerationError(f"{len(images)} images but {len(instructions)} instructions")
    if tuple(images.shape[1:]) != (c.image_channels, c.image_size, c.image_size):
        raise GenerationError(f"images of shape {tuple(images.shape[1:])}; the model edits "
                              f"{c.image_channels}x{c.image_size}x{c.image_size} (images.read_image resizes files)")
    ids = encode_instructions(model, tokenizer, instructions)
    guided = cfg_scale != 1.0
    rows = edit_rows(tokenizer, ids, images, guided)
    dec = Decoder(model, len(rows), tokenizer.pad_id, max_len=edit_length(max(len(x) for x in ids),
                                                                           c.patches_per_image))
    dec.prefill(rows)
    smp = build_sampler(schedule, steps, sampler, clip_x0=clip_for(codec, clip_x0))
    x = dec.diffuse(smp, cfg_scale, len(images), generator, progress=progress, commit=False)  # (N, n, D)
    return decode_images(codec, unpatchify(x, c.patch_size, c.image_channels, c.image_size, c.image_size))
