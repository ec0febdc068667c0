"""Mode-switching decoding (paper §3 "Inference"): LM sampling until BOI, then diffusion, then EOI and back.

Batched over prompts. Each prompt row is left-padded into one KV cache (the padding is its own document, so
the mask hides it, and RoPE positions start at 0 where the real text starts). In diffusion mode n noise
patches are appended after BOI; at each of the sampler's steps only those n positions run through the model
against the cached prefix (`commit=False`, the prefix KV is computed once), and the prediction overwrites the
patches. With CFG the conditional rows and their unconditional twins (`BOS BOI`, the caption-dropout
context seen in training) run in one batch. The finished image is then written into the cache as a clean
image (t = 0), EOI is appended and LM mode resumes.

`generate_batch` writes several mixed-modal documents at once. It runs in phases: text phases in lock step over
the rows still writing (a row that emits BOI or EOS leaves the batch), then one diffusion over every row that
emitted BOI, with their CFG twins, while the others wait; then text again. Diffusion (steps x forward passes)
dwarfs text decoding, so drawing images that were asked for at different times in one batch beats pausing the
text at each row's BOI; the price is that a row which asked for an image idles until the others stop writing.
Row b draws every random number (text sampling, image noise) from its own generator, in the order one
`generate` call with that generator would, so a batch equals separate calls up to floating-point rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from transfusion.codec import Codec, clip_for, decode_images, encode_images
from transfusion.config import DiffusionConfig, samplers_for
from transfusion.diffusion.flow import FlowSampler, FlowSchedule
from transfusion.diffusion.samplers import DiffusionSampler, build_sampler, cfg_combine
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.images import patchify, unpatchify
from transfusion.model.transfusion import Transfusion

Segment = list[int] | Tensor  # token ids, or a clean image (C, H, W)
# one generator for the whole batch, or one per conditional row (row b's noise then comes from generators[b])
Generators = torch.Generator | Sequence[torch.Generator | None] | None


class GenerationError(ValueError):
    """A request the model cannot serve (a prompt longer than its context, no images asked for, ...)."""


def sampling_args(dc: DiffusionConfig, steps: int | None = None, cfg_scale: float | None = None,
                  sampler: str | None = None) -> dict[str, Any]:
    """steps / cfg_scale / sampler for `generate_images` and `generate`: [diffusion]'s, unless overridden.
    The one place every caller (trainer grids, CLI, eval, demo) takes its sampling settings from."""
    steps = steps or dc.sample_steps
    if not 1 <= steps <= dc.num_train_steps:
        raise GenerationError(f"{steps} denoising steps: expected 1..{dc.num_train_steps} "
                              "(the model was trained with diffusion.num_train_steps of them)")
    sampler = sampler or dc.sampler.value
    if sampler not in [s.value for s in samplers_for(dc.objective)]:
        raise GenerationError(f"sampler {sampler!r} does not sample the {dc.objective.value!r} objective this model "
                              f"was trained with; use one of {[s.value for s in samplers_for(dc.objective)]}")
    return {"steps": steps, "cfg_scale": dc.cfg_scale if cfg_scale is None else cfg_scale, "sampler": sampler}


def check_fits(model: Transfusion, length: int, what: str) -> None:
    """GenerationError when a sequence of `length` positions exceeds the model's context (model.max_seq_len)."""
    if length > model.cfg.max_seq_len:
        raise GenerationError(f"{what} needs {length} positions but the model's context is "
                              f"{model.cfg.max_seq_len} (model.max_seq_len); shorten the prompt")


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class Decoder:
    """A batch of sequences being extended in place, with their KV cache."""

    def __init__(self, model: Transfusion, batch: int, pad_id: int, max_len: int | None = None):
        """`max_len`: cache slots, by default the model's context. Rows are left-padded to the longest, so a
        short prompt decoding next to a long one may need more slots than that, though no row's own positions
        (RoPE) ever exceed the context."""
        if batch < 1:
            raise GenerationError(f"nothing to decode: {batch} rows")
        self.model, self.pad_id = model, pad_id
        cfg = model.cfg
        self.device = model.tok_emb.weight.device
        self.cache = model.new_cache(batch, max_len or cfg.max_seq_len)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) next RoPE position
        self.n_images = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) images so far
        self.n, self.patch_dim = cfg.patches_per_image, cfg.patch_dim

    @torch.no_grad()
    def prefill(self, rows: list[list[Segment]]) -> Tensor:
        """Left-pad and run the prompts; returns the next-token logits (B, V)."""
        k = self.model.cfg.patch_size
        flat: list[tuple[list[int], list[int], list[Tensor]]] = []
        for segments in rows:
            toks, imgs, patches = [], [], []
            for seg in segments:
                if isinstance(seg, Tensor):
                    img_id = len(patches)
                    patches.append(patchify(seg.unsqueeze(0).to(self.device), k)[0])  # (n, D)
                    toks += [self.pad_id] * self.n
                    imgs += [img_id] * self.n
                else:
                    toks += list(seg)
                    imgs += [-1] * len(seg)
            flat.append((toks, imgs, patches))
        L = max(len(f[0]) for f in flat)
        B = len(rows)
        tokens = torch.full((B, L), self.pad_id, dtype=torch.long)
        image_ids = torch.full((B, L), -1, dtype=torch.long)
        doc_ids = torch.zeros((B, L), dtype=torch.long)  # padding = doc 0, prompt = doc 1
        positions = torch.zeros((B, L), dtype=torch.long)
        all_patches: list[Tensor] = []
        for b, (toks, imgs, patches) in enumerate(flat):
            off = L - len(toks)
            tokens[b, off:] = torch.tensor(toks)
            image_ids[b, off:] = torch.tensor(imgs)
            doc_ids[b, off:] = 1
            positions[b, off:] = torch.arange(len(toks))
            self.next_pos[b] = len(toks)
            self.n_images[b] = len(patches)
            all_patches += patches
        x = torch.cat(all_patches) if all_patches else torch.zeros(0, self.patch_dim)
        return self._run(tokens, image_ids, doc_ids, positions, x, commit=True)

    def _run(self, tokens, image_ids, doc_ids, positions, x, t=None, commit=True, logits=True):
        d = self.device
        x = x.to(d, self.model.tok_emb.weight.dtype)
        t = torch.zeros(x.shape[0], dtype=torch.long, device=d) if t is None else t
        last = torch.zeros(tokens.shape, dtype=torch.bool, device=d)
        if logits:
            last[:, -1] = True
        out = self.model(tokens.to(d), image_ids.to(d), doc_ids.to(d), positions.to(d), x, t,
                         logits_mask=last, cache=self.cache, commit=commit)
        self.last_out = out.diffusion  # (P, D) eps or v
        return out.logits  # (B, V)

    @torch.no_grad()
    def append_tokens(self, ids: Tensor) -> Tensor:
        """Append one token per row (B,); returns next-token logits (B, V)."""
        B = ids.shape[0]
        pos = self.next_pos.clone()
        self.next_pos += 1
        return self._run(ids.view(B, 1), torch.full((B, 1), -1), torch.ones((B, 1), dtype=torch.long),
                         pos.view(B, 1), torch.zeros(0, self.patch_dim))

    def _image_slots(self):
        B, n = self.next_pos.shape[0], self.n
        positions = self.next_pos[:, None] + torch.arange(n, device=self.device)  # (B, n)
        image_ids = self.n_images[:, None].expand(B, n)
        tokens = torch.full((B, n), self.pad_id, dtype=torch.long)
        return tokens, image_ids, torch.ones((B, n), dtype=torch.long), positions

    @torch.no_grad()
    def diffuse(self, sampler: DiffusionSampler | FlowSampler, cfg_scale: float, n_cond: int,
                generator: Generators = None, progress: bool = False, commit: bool = True) -> Tensor:
        """Denoise one image per conditional row; rows [n_cond:] are the unconditional twins (if any).

        Returns x_0 patches (n_cond, n, D). With `commit` the clean image is written into the cache (t = 0)
        for every row and the positions advance past it. `generator` may be a list, one per conditional row.
        """
        B, n, D = self.next_pos.shape[0], self.n, self.patch_dim
        guided = B > n_cond
        if guided and B != 2 * n_cond:
            raise ValueError("with CFG the decoder must hold n_cond conditional rows then n_cond unconditional")
        tokens, image_ids, doc_ids, positions = self._image_slots()

        def predict(x: Tensor, t: Tensor) -> Tensor:  # (n_cond, n, D), scalar t -> guided eps / velocity
            tt = t.to(self.device).expand(B * n)
            x_in = (torch.cat([x, x]) if guided else x).reshape(B * n, D)
            self._run(tokens, image_ids, doc_ids, positions, x_in, tt, commit=False, logits=False)
            pred = sampler.to_guided_space(x_in.float(), self.last_out.float(), tt).view(B, n, D)
            return cfg_combine(pred[:n_cond], pred[n_cond:], cfg_scale) if guided else pred

        if isinstance(generator, (list, tuple)):
            if len(generator) != n_cond:
                raise ValueError(f"{len(generator)} generators for {n_cond} conditional rows")
            x = torch.cat([_randn((1, n, D), g, self.device) for g in generator])
            x = _sample_per_row(sampler, x, predict, generator, progress)
        else:
            x = sampler.sample(_randn((n_cond, n, D), generator, self.device), predict, generator, progress)
        if commit:
            x_in = torch.cat([x, x]) if guided else x
            self._run(tokens, image_ids, doc_ids, positions, x_in.reshape(B * n, D), commit=True, logits=False)
            self.next_pos += n
            self.n_images += 1
        return x

    def select_rows(self, rows: Tensor) -> None:
        self.cache.select_rows(rows)
        self.next_pos, self.n_images = self.next_pos[rows], self.n_images[rows]


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on the generator's device (CPU noise stays reproducible), moved to `device`."""
    return torch.randn(shape, generator=generator, device=device if generator is None
                       else generator.device).to(device)


def _sample_per_row(sampler: DiffusionSampler | FlowSampler, x: Tensor, predict: Callable[[Tensor, Tensor], Tensor],
                    generators: Sequence[torch.Generator | None], progress: Any) -> Tensor:
    """`sampler.sample` where row b of x (rows, n, D) draws its DDPM noise from generators[b]: a row gets the
    same numbers whether it is sampled alone or in a batch."""
    if not isinstance(sampler, DiffusionSampler):  # rectified flow integrates an ODE: no noise after the start
        return sampler.sample(x, predict, None, progress)
    for i in tqdm(range(len(sampler)), desc="diffusion", disable=progress is not True, leave=False):
        eps = predict(x, sampler.timesteps[i]).float()  # (rows, n, D) guided eps
        x = torch.cat([sampler.step(x[b:b + 1], eps[b:b + 1], i, g) for b, g in enumerate(generators)])
        if callable(progress):
            progress(i + 1, len(sampler))
    return x


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Greedy when temperature == 0 (paper §4.1), else temperature + nucleus sampling. (B, V) -> (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _images_from_patches(model: Transfusion, x: Tensor) -> Tensor:
    c = model.cfg
    return unpatchify(x, c.patch_size, c.image_channels, c.image_size, c.image_size)  # (N, C, H, W)


@torch.no_grad()
def generate_images(
    model: Transfusion, tokenizer: TokenizerLike, prompts: list[str], schedule: NoiseSchedule | FlowSchedule,
    steps: int = 250, cfg_scale: float = 3.0, sampler: str = "ddpm", generator: torch.Generator | None = None,
    progress: bool = True, clip_x0: float | None = 1.0, codec: Codec | None = None,
) -> Tensor:
    """Text -> image for a batch of captions: (N, C, H, W). CFG runs cond + uncond in one batch. With a `codec`
    (codec.py: the model's own, e.g. a VAE's latents) the images come back as pixels and x0 is clipped as it says."""
    if not prompts:
        raise GenerationError("no prompt to draw: ask for at least one image")
    tk = tokenizer
    cond = [[[tk.bos_id] + tk.encode(p) + [tk.boi_id]] for p in prompts]
    guided = cfg_scale != 1.0
    rows = cond + ([[[tk.bos_id, tk.boi_id]]] * len(prompts) if guided else [])
    n_len = max(len(r[0]) for r in rows) + model.cfg.patches_per_image
    check_fits(model, n_len, "the prompt and its image")
    dec = Decoder(model, len(rows), tk.pad_id, max_len=n_len)
    dec.prefill(rows)
    smp = build_sampler(schedule, steps, sampler, clip_x0=clip_for(codec, clip_x0))
    x = dec.diffuse(smp, cfg_scale, len(prompts), generator, progress=progress, commit=False)
    return decode_images(codec, _images_from_patches(model, x))


@torch.no_grad()
def _lm_loop(dec: Decoder, logits: Tensor, tk: TokenizerLike, max_new_tokens: int, stop_ids: set[int],
             banned: list[int], temperature: float, top_p: float, generator, min_new_tokens: int = 0,
             ) -> list[list[int]]:
    """Lock-step LM decoding of all rows until each hits a stop id; returns generated ids per row. EOS is
    banned for the first `min_new_tokens` tokens."""
    B = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for j in range(max_new_tokens):
        ban = banned + [tk.eos_id] if j < min_new_tokens else banned
        if ban:
            logits[:, ban] = float("-inf")
        nxt = sample_next(logits, temperature, top_p, generator).cpu()
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in stop_ids
        if bool(done.all()):
            break
        logits = dec.append_tokens(nxt.to(dec.device))
    return out


@torch.no_grad()
def caption_images(model: Transfusion, tokenizer: TokenizerLike, images: Tensor, max_new_tokens: int = 32,
                   temperature: float = 0.0, codec: Codec | None = None) -> list[str]:
    """Image -> text: `BOS BOI <clean image, t=0> EOI` then greedy LM (BOI banned) until EOS. With a `codec` the
    images are pixels, encoded as the model sees them (e.g. VAE latents)."""
    tk = tokenizer
    images = encode_images(codec, images)
    rows = [[[tk.bos_id, tk.boi_id], img, [tk.eoi_id]] for img in images]
    prefix = 3 + model.cfg.patches_per_image
    check_fits(model, prefix + 1, "an image to caption")
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - prefix)  # the caption ends where the context does
    dec = Decoder(model, len(rows), tk.pad_id, max_len=prefix + max_new_tokens)
    logits = dec.prefill(rows)
    banned = [tk.boi_id, tk.eoi_id, tk.bos_id, tk.pad_id]
    ids = _lm_loop(dec, logits, tk, max_new_tokens, {tk.eos_id}, banned, temperature, 1.0, None)
    return [tk.decode([i for i in r if i != tk.eos_id]).strip() for r in ids]


@dataclass
class _Row:
    """One document of `generate_batch` being written."""

    context: list[Segment]  # everything so far: token lists and clean images (C, H, W)
    generator: torch.Generator | None
    wants_image: bool  # the prompt ended with <boi>, or the model emitted BOI: an image is drawn next
    budget: int  # text tokens left (max_new_tokens minus those written)
    pieces: list[str | Tensor]
    done: bool = False


@torch.no_grad()
def generate(
    model: Transfusion, tokenizer: TokenizerLike, prompt: str, schedule: NoiseSchedule | FlowSchedule,
    max_new_tokens: int = 128, max_images: int = 4, steps: int = 250, cfg_scale: float = 3.0,
    sampler: str = "ddpm", temperature: float = 0.0, top_p: float = 1.0,
    generator: torch.Generator | None = None, progress: bool = True, clip_x0: float | None = 1.0,
    min_new_tokens: int = 0, codec: Codec | None = None,
) -> list[str | Tensor]:
    """Free mode-switching generation from a text prompt: a list of text pieces and images (C, H, W).

    When the model emits BOI (or the prompt ends with "<boi>"), an image is diffused; EOI is appended and text
    continues, until EOS, `max_new_tokens` text tokens or `max_images` images; EOS is banned until
    `min_new_tokens` text tokens are out (greedy decoding of a short prompt can end the document at once).
    At each BOI the context is prefilled once together with its unconditional twin for CFG (a negligible cost
    next to the diffusion steps), then decoding continues on the conditional row alone. The twin is `BOS BOI`
    (see `generate_batch`). One row of `generate_batch`.
    """
    return generate_batch(
        model, tokenizer, [prompt], schedule, max_new_tokens=max_new_tokens, max_images=max_images, steps=steps,
        cfg_scale=cfg_scale, sampler=sampler, temperature=temperature, top_p=top_p, generators=[generator],
        progress=progress, clip_x0=clip_x0, min_new_tokens=min_new_tokens, codec=codec,
    )[0]


@torch.no_grad()
def generate_batch(
    model: Transfusion, tokenizer: TokenizerLike, prompts: list[str], schedule: NoiseSchedule | FlowSchedule,
    max_new_tokens: int = 128, max_images: int = 4, steps: int = 250, cfg_scale: float = 3.0,
    sampler: str = "ddpm", temperature: float = 0.0, top_p: float = 1.0,
    generators: Sequence[torch.Generator | None] | None = None, progress: bool = True,
    clip_x0: float | None = 1.0, min_new_tokens: int = 0, codec: Codec | None = None,
) -> list[list[str | Tensor]]:
    """`generate` for several prompts at once: one list of text pieces and images per prompt (images as pixels
    through `codec` when given; the context keeps what the model drew).

    Phases (module docstring): lock-step text for the rows still writing, then one diffusion for every row that
    emitted BOI, while the rest wait. Row b samples with `generators[b]` only, so the result equals
    `generate(prompts[b], generator=generators[b])` up to rounding (greedy text is then identical).

    The CFG twin of every image, the first or a later one, is `BOS BOI`: no text and no earlier image. CFG
    contrasts the prediction conditioned on the context with the unconditioned one (paper §2.2), and `BOS BOI`
    is the one unconditional context training shows the model (caption dropout, data/sequences.py); a twin
    holding the earlier images but not the text would be a context it never saw. Guidance so pushes towards
    everything before the BOI, earlier images included.
    """
    if not prompts:
        raise GenerationError("no prompt to continue: give at least one")
    gens = list(generators) if generators is not None else [None] * len(prompts)
    if len(gens) != len(prompts):
        raise GenerationError(f"{len(gens)} generators for {len(prompts)} prompts: give one per prompt")
    tk, n = tokenizer, model.cfg.patches_per_image
    rows: list[_Row] = []
    for i, prompt in enumerate(prompts):
        force_image = prompt.rstrip().endswith("<boi>")
        context: list[Segment] = [[tk.bos_id] + tk.encode(prompt.replace("<boi>", "").rstrip())]
        what = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
        check_fits(model, _length(context, n) + (n + 1 if force_image else 1), what)
        rows.append(_Row(context, gens[i], force_image, max_new_tokens, []))
    smp = build_sampler(schedule, steps, sampler, clip_x0=clip_for(codec, clip_x0))
    while True:
        writing = [r for r in rows if not r.done and not r.wants_image]
        if writing:
            _text_phase(model, tk, writing, temperature, top_p, min_new_tokens - max_new_tokens, max_images)
        drawing = [r for r in rows if not r.done and r.wants_image]
        if not drawing:
            if codec is None:
                return [r.pieces for r in rows]
            return [[codec.decode(p[None])[0] if isinstance(p, Tensor) else p for p in r.pieces] for r in rows]
        _image_phase(model, tk, drawing, smp, cfg_scale, progress)


def _text_phase(model: Transfusion, tk: TokenizerLike, rows: list[_Row], temperature: float, top_p: float,
                min_offset: int, max_images: int) -> None:
    """Write text on every row until it emits EOS or BOI, or runs out of budget or context; then mark it done,
    or waiting for an image (BOI, budget left, room for one, fewer than `max_images` so far). EOS is banned
    while fewer than min_new_tokens = min_offset + max_new_tokens tokens are out."""
    n, ctx_len = model.cfg.patches_per_image, model.cfg.max_seq_len
    limits = [min(r.budget, ctx_len - _length(r.context, n)) for r in rows]  # text stops where the context ends
    longest = max(_length(r.context, n) for r in rows)
    dec = Decoder(model, len(rows), tk.pad_id, max_len=longest + max(max(limits), 1))
    logits = dec.prefill([r.context for r in rows])
    min_new = [min_offset + r.budget for r in rows]  # = min_new_tokens - tokens written so far
    out = _decode_rows(dec, logits, tk, limits, {tk.eos_id, tk.boi_id}, [tk.bos_id, tk.eoi_id, tk.pad_id],
                       temperature, top_p, [r.generator for r in rows], min_new)
    for r, ids in zip(rows, out):
        r.budget -= len(ids)
        text_ids = [i for i in ids if i not in (tk.eos_id, tk.boi_id)]
        if text_ids:
            r.pieces.append(tk.decode(text_ids))
            r.context.append(text_ids)
        boi = bool(ids) and ids[-1] == tk.boi_id and r.budget > 0
        room = _length(r.context, n) + 1 + n <= ctx_len  # BOI, then the image's n patches
        r.wants_image = boi and room and sum(isinstance(p, Tensor) for p in r.pieces) < max_images
        r.done = not r.wants_image


def _image_phase(model: Transfusion, tk: TokenizerLike, rows: list[_Row], smp, cfg_scale: float,
                 progress: bool) -> None:
    """Draw the next image of every row at once: rows' contexts + BOI, then (CFG) one `BOS BOI` twin each."""
    for r in rows:
        r.context.append([tk.boi_id])
    guided = cfg_scale != 1.0
    contexts = [r.context for r in rows] + ([[[tk.bos_id, tk.boi_id]]] * len(rows) if guided else [])
    dec = Decoder(model, len(contexts), tk.pad_id)
    dec.prefill(contexts)
    x = dec.diffuse(smp, cfg_scale, len(rows), [r.generator for r in rows], progress=progress, commit=False)
    for r, img in zip(rows, _images_from_patches(model, x)):  # (C, H, W) each
        r.pieces.append(img)
        r.context += [img, [tk.eoi_id]]
        r.wants_image = False


@torch.no_grad()
def _decode_rows(dec: Decoder, logits: Tensor, tk: TokenizerLike, limits: list[int], stop_ids: set[int],
                 banned: list[int], temperature: float, top_p: float, generators: list, min_new: list[int],
                 ) -> list[list[int]]:
    """Lock-step LM decoding where row b stops at a stop id or after limits[b] tokens and samples with
    generators[b]; EOS is banned for its first min_new[b] tokens. A finished row leaves the batch (its cache row
    too), so it costs nothing more and its positions never run past its own room."""
    out: list[list[int]] = [[] for _ in limits]
    live = [b for b, lim in enumerate(limits) if lim > 0]  # cache row i holds row live[i]
    if len(live) < len(limits):
        if not live:
            return out
        dec.select_rows(torch.tensor(live, device=dec.device))
        logits = logits[torch.tensor(live, device=logits.device)]
    for j in range(max(limits)):  # every live row has written j tokens
        for i, b in enumerate(live):
            logits[i, banned + [tk.eos_id] if j < min_new[b] else banned] = float("-inf")
        if temperature <= 0:
            nxt = sample_next(logits).cpu()  # (live,) greedy
        else:  # one draw per row from its own generator, as the row alone would
            nxt = torch.cat([sample_next(logits[i:i + 1], temperature, top_p, generators[b]).cpu()
                             for i, b in enumerate(live)])
        keep = []
        for i, b in enumerate(live):
            out[b].append(int(nxt[i]))
            if int(nxt[i]) not in stop_ids and len(out[b]) < limits[b]:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(live):
            dec.select_rows(torch.tensor(keep, device=dec.device))
            nxt, live = nxt[keep], [live[i] for i in keep]
        logits = dec.append_tokens(nxt.to(dec.device))
    return out


def _length(context: list[Segment], patches_per_image: int) -> int:
    """Positions a context of token lists and images occupies."""
    return sum(patches_per_image if isinstance(seg, Tensor) else len(seg) for seg in context)
