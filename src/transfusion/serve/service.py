"""What the web demo can do with one loaded model, as plain functions of bytes and strings (no HTTP here).

    svc = ModelService.load("runs/demo", limits)
    png = svc.draw(DrawRequest("a red sneaker", steps=50, cfg=3.0, seed=0), progress)   # text -> image
    text = svc.caption(upload_bytes)                                                     # image -> text
    png = svc.edit(upload_bytes, "make it blue", progress)                               # image + text -> image
    pieces = svc.generate("a red sneaker", progress)                                     # free generation

Every input is checked here, before it reaches the queue, with an `InvalidRequest` that says what is wrong
(the app turns it into a 4xx): prompts must fit the model's context, uploads are decoded in memory (never
written to disk) and refused by type, byte size or pixel count before the pixels are decoded.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from transfusion.images import ImageReadError, read_image, to_uint8

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class InvalidRequest(ValueError):
    """A request the server refuses with a reason; `status` is the HTTP code (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeLimits:
    """Everything `transfusion serve` bounds; one flag each (cli.py)."""

    max_upload_bytes: int = 4 * 1024 * 1024  # 413 above this
    max_pixels: int = 4096 * 4096  # decoded width x height; checked from the header before decoding
    max_queue: int = 8  # requests queued or running; 429 above this
    timeout_s: float = 120.0  # per request, queue wait included; 504 after it
    max_steps: int = 1000  # denoising steps a request may ask for
    max_new_tokens: int = 256  # text tokens a free generation may write


@dataclass(frozen=True)
class DrawRequest:
    prompt: str
    steps: int | None = None  # None: the checkpoint's diffusion.sample_steps
    cfg: float | None = None  # None: diffusion.cfg_scale
    seed: int = 0


def png_bytes(image: torch.Tensor, scale: int = 1) -> bytes:
    """(C, H, W) in [-1, 1] -> PNG bytes, nearest-neighbour upscaled `scale` times (small images in a browser)."""
    arr = to_uint8(image[None])[0]
    im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class ModelService:
    def __init__(self, loaded: Any, limits: ServeLimits, display_scale: int = 8):
        from transfusion.diffusion import build_schedule

        self.m, self.limits, self.scale = loaded, limits, display_scale
        self.schedule = build_schedule(loaded.config.diffusion)

    @classmethod
    def load(cls, ckpt: str | Path, limits: ServeLimits, use_ema: bool = True) -> "ModelService":
        from transfusion.backends import setup_process
        from transfusion.inference import load

        loaded = load(ckpt, use_ema=use_ema)
        setup_process(loaded.config.runtime)
        return cls(loaded, limits)

    # ------------------------------------------------------------------------------------- checks

    def info(self) -> dict[str, Any]:
        c, d = self.m.config.model, self.m.config.diffusion
        return {"checkpoint": str(self.m.path), "image_size": self.m.codec.pixel_size, "channels": 3,
                "latents": bool(self.m.config.data.vae),
                "context": c.max_seq_len, "objective": d.objective.value, "prediction": d.prediction.value,
                "sample_steps": d.sample_steps, "cfg_scale": d.cfg_scale, "sampler": d.sampler.value,
                # /api/edit works on any checkpoint, but only a model fine-tuned on edits (docs/editing.md) edits
                "trained_for_editing": self.m.config.data.dataset in ("edit", "recolour")}

    def _text(self, text: str, what: str, room: int) -> list[int]:
        """Token ids of a prompt or instruction that must fit in `room` positions of the context."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"the {what} is empty")
        ids = self.m.tokenizer.encode(text)
        if len(ids) > room:
            raise InvalidRequest(f"the {what} is {len(ids)} tokens; this model has room for {max(room, 0)} "
                                 f"(context {self.m.config.model.max_seq_len} positions, image included)")
        return ids

    def _sampling(self, steps: int | None, cfg: float | None) -> dict[str, Any]:
        from transfusion.decoding import sampling_args

        if steps is not None and not 1 <= steps <= self.limits.max_steps:
            raise InvalidRequest(f"steps must be between 1 and {self.limits.max_steps}, got {steps}")
        if cfg is not None and not 0.0 <= cfg <= 50.0:
            raise InvalidRequest(f"cfg must be between 0 and 50, got {cfg}")
        return sampling_args(self.m.config.diffusion, steps or 0, cfg)

    def decode_upload(self, data: bytes) -> torch.Tensor:
        """Uploaded bytes -> (C, H, W) in [-1, 1] at the model's size; refused by size, type or pixel count."""
        if len(data) > self.limits.max_upload_bytes:
            raise InvalidRequest(f"the upload is {len(data):,} bytes; the limit is {self.limits.max_upload_bytes:,}",
                                 413)
        if not data:
            raise InvalidRequest("the upload is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                fmt, (w, h) = im.format, im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InvalidRequest(f"the upload is not an image ({e})", 415) from e
        if fmt not in IMAGE_FORMATS:
            raise InvalidRequest(f"image type {fmt} is not accepted; send one of {', '.join(IMAGE_FORMATS)}", 415)
        if w * h > self.limits.max_pixels:
            raise InvalidRequest(f"the image is {w}x{h} = {w * h:,} pixels; the limit is {self.limits.max_pixels:,}",
                                 413)
        c = self.m.config.model
        try:
            # centre crop + resize, as training; pixels at the codec's input size (the VAE's, for latent models)
            return read_image(io.BytesIO(data), self.m.codec.pixel_size, 3 if self.m.config.data.vae else c.image_channels)
        except ImageReadError as e:
            raise InvalidRequest(f"the image cannot be decoded: {e}", 415) from e

    # ------------------------------------------------------------------------------------- model calls
    # Each check_* runs in the request handler (fast, before queueing); each run_* on the inference thread.

    def check_draw(self, req: DrawRequest) -> dict[str, Any]:
        n = self.m.config.model.patches_per_image
        self._text(req.prompt, "prompt", self.m.config.model.max_seq_len - n - 2)  # BOS prompt BOI patches
        return self._sampling(req.steps, req.cfg)

    def run_draw(self, req: DrawRequest, sampling: dict[str, Any], progress) -> bytes:
        from transfusion.decoding import generate_images

        gen = torch.Generator().manual_seed(int(req.seed))
        with torch.no_grad():
            img = generate_images(self.m.model, self.m.tokenizer, [req.prompt], self.schedule, generator=gen,
                                  progress=progress, codec=self.m.codec, **sampling)[0]
        return png_bytes(img, self.scale)

    def run_caption(self, image: torch.Tensor) -> str:
        from transfusion.decoding import caption_images

        with torch.no_grad():
            return caption_images(self.m.model, self.m.tokenizer, image[None], codec=self.m.codec)[0]

    def check_edit(self, instruction: str) -> dict[str, Any]:
        n = self.m.config.model.patches_per_image
        self._text(instruction, "instruction", self.m.config.model.max_seq_len - 2 * n - 4)  # editing.edit_length
        return self._sampling(None, None)

    def run_edit(self, image: torch.Tensor, instruction: str, sampling: dict[str, Any], progress,
                 seed: int = 0) -> bytes:
        from transfusion.editing import edit_images

        with torch.no_grad():
            out = edit_images(self.m.model, self.m.tokenizer, image[None], [instruction], self.schedule,
                              generator=torch.Generator().manual_seed(int(seed)), progress=progress,
                              codec=self.m.codec, **sampling)
        return png_bytes(out[0], self.scale)

    def check_generate(self, prompt: str, max_new_tokens: int | None) -> int:
        self._text(prompt, "prompt", self.m.config.model.max_seq_len - 2)
        n = max_new_tokens or 64
        if not 1 <= n <= self.limits.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens must be between 1 and {self.limits.max_new_tokens}, got {n}")
        return n

    def run_generate(self, prompt: str, max_new_tokens: int, seed: int, progress) -> list[dict[str, str]]:
        """Free generation -> [{"type": "text", "text"} | {"type": "image", "png": base64}] in order."""
        from transfusion.decoding import generate

        with torch.no_grad():
            parts = generate(self.m.model, self.m.tokenizer, prompt, self.schedule, max_new_tokens=max_new_tokens,
                             generator=torch.Generator().manual_seed(int(seed)), progress=progress,
                             codec=self.m.codec, **self._sampling(None, None))
        return [{"type": "image", "png": base64.b64encode(png_bytes(p, self.scale)).decode()}
                if isinstance(p, torch.Tensor) else {"type": "text", "text": str(p)} for p in parts]
