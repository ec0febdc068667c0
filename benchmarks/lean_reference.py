"""A lean, self-contained Transfusion with the paper's defaults, to calibrate the project's implementation.

    python benchmarks/lean_reference.py --out runs/lean [--steps 720] [--variant key=value ...]

Everything model- and training-side is written out here in plain PyTorch (no import from transfusion.model,
train, losses or diffusion), so a quality gap between this file and `transfusion train` points at the
project's code. Only the data (colour fashion train split, its captions, the shared tokenizer) and the scorer
(item classifier + colour reader of the evaluation suite) are shared, so both sides see the same images and are
judged the same way.

Paper defaults: eps-prediction, cosine DDPM schedule (1000 steps), linear patches with the timestep embedding
added to each patch vector before the linear layer (fn. 6), lambda = 5, 80/20 caption-first/image-first with
t <= 500 for image-first pairs, caption dropout 0.1, DDIM 50 with CFG 3 and x0 clipping at sampling.
Each `--variant` flips one design choice (see VARIANTS) for bisection against the project.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {
    "pos": "abs",        # abs: learned absolute position embedding | rope: rotary (the project's choice)
    "temb": "patch",     # patch: sinusoid -> MLP -> added to the patch vector (fn. 6) | hidden: added after proj_in
    "norm": "ln",        # ln: LayerNorm + GELU MLP | rms: RMSNorm + SwiGLU (the project's blocks)
    "init": "torch",     # torch: PyTorch default inits | small: normal(0.02), zero-init output (the project's)
    "lr": "3e-4",
    "images": "64",      # images per step
    "bf16": "1",
}


def cosine_abar(T: int = 1000, s: float = 0.008) -> torch.Tensor:
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float()


def sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2) / (dim // 2))
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], -1)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: str):
        super().__init__()
        Norm = nn.LayerNorm if norm == "ln" else nn.RMSNorm
        self.n1, self.n2, self.heads = Norm(d), Norm(d), heads
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.swiglu = norm == "rms"
        hidden = 4 * d if not self.swiglu else 683
        self.up = nn.Linear(d, hidden * (2 if self.swiglu else 1), bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x, mask, rope):
        B, L, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, D))
        h = self.up(self.n2(x))
        h = F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if self.swiglu else F.gelu(h)
        return x + self.down(h)


def apply_rope(x, rope):  # x (B, H, L, hd); rope (cos, sin) each (L, hd/2)
    cos, sin = rope
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class Lean(nn.Module):
    def __init__(self, vocab: int, v: dict, d: int = 256, layers: int = 8, heads: int = 4, pd: int = 48,
                 max_len: int = 80):
        super().__init__()
        self.v, self.d = v, d
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d) if v["pos"] == "abs" else None
        t_out = pd if v["temb"] == "patch" else d
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, t_out))
        self.p_in, self.p_out = nn.Linear(pd, d), nn.Linear(d, pd)
        self.blocks = nn.ModuleList(Block(d, heads, v["norm"]) for _ in range(layers))
        self.norm = nn.LayerNorm(d) if v["norm"] == "ln" else nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        hd = d // heads
        inv = 1.0 / 10_000 ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(max_len).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        if v["init"] == "small":
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
            nn.init.zeros_(self.p_out.weight)

    def forward(self, tokens, img_mask, x_t, t, attn):
        """tokens (B, L); img_mask (B, L) bool, 49 per row; x_t (B, 49, 48); t (B,) -> logits, eps (B, 49, 48)."""
        B, L = tokens.shape
        temb = self.t_mlp(sinusoid(t).to(x_t.dtype))  # (B, 48) or (B, d)
        if self.v["temb"] == "patch":
            p = self.p_in(x_t + temb[:, None])
        else:
            p = self.p_in(x_t) + temb[:, None]
        h = self.tok(tokens)
        h = h.masked_scatter(img_mask[..., None], p.to(h.dtype))
        if self.pos is not None:
            h = h + self.pos.weight[:L]
        rope = (self.cos[:L], self.sin[:L]) if self.pos is None else None
        for b in self.blocks:
            h = b(h, attn, rope)
        h = self.norm(h)
        return self.head(h), self.p_out(h[img_mask].view(B, -1, h.shape[-1]))


def build_batch(ds, tk, idx, rng, image_first, drop, L=80):
    """Rows: BOS caption BOI img EOI EOS (or BOS BOI img EOI caption EOS), right-padded to L."""
    B = len(idx)
    tokens = torch.full((B, L), tk.pad_id)
    img = torch.zeros(B, L, dtype=torch.bool)
    valid = torch.zeros(B, L, dtype=torch.bool)
    lm_t = torch.full((B, L), -100)
    for j, i in enumerate(idx):
        alts = ds.caption_sets[ds.caption_of[i]]
        cap = [] if drop[j] else list(alts[rng.integers(len(alts))])
        if image_first[j]:
            seq = [tk.bos_id, tk.boi_id] + [0] * 49 + [tk.eoi_id] + cap + [tk.eos_id]
            s = 2
        else:
            seq = [tk.bos_id] + cap + [tk.boi_id] + [0] * 49 + [tk.eoi_id, tk.eos_id]
            s = len(cap) + 2
        n = len(seq)
        tokens[j, :n] = torch.tensor(seq)
        img[j, s:s + 49] = True
        valid[j, :n] = True
        tgt = torch.tensor(seq[1:] + [-100])
        tgt[s - 1:s + 49] = -100  # no LM loss predicting patches; EOI after the image is predicted
        lm_t[j, :n] = tgt
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    same_img = img[:, :, None] & img[:, None, :]
    attn = (causal[None] | same_img) & valid[:, None, :]
    attn = attn | torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    return tokens, img, lm_t, attn[:, None]


@torch.no_grad()
def sample(model, tk, prompts, abar, steps=50, cfg=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = torch.linspace(999, 0, steps).round().long()
    n = len(prompts)
    rows = [[tk.bos_id] + tk.encode(p) + [tk.boi_id] for p in prompts] + [[tk.bos_id, tk.boi_id]] * n
    L = max(len(r) for r in rows) + 49
    tokens = torch.full((2 * n, L), tk.pad_id)
    img = torch.zeros(2 * n, L, dtype=torch.bool)
    valid = torch.zeros(2 * n, L, dtype=torch.bool)
    for j, r in enumerate(rows):
        tokens[j, :len(r)] = torch.tensor(r)
        img[j, len(r):len(r) + 49] = True
        valid[j, :len(r) + 49] = True
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    attn = ((causal[None] | (img[:, :, None] & img[:, None, :])) & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)
    x = torch.randn(n, 49, 48, generator=g)
    for i, t in enumerate(ts):
        a = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, e = model(tokens, img, torch.cat([x, x]), torch.full((2 * n,), int(t)), attn[:, None])
        e = e.float()
        eps = e[n:] + cfg * (e[:n] - e[n:])
        x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=720)
    p.add_argument("--n", type=int, default=160, help="samples scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", nargs="*", default=[], help="key=value, keys: " + ", ".join(VARIANTS))
    args = p.parse_args()
    from transfusion.data.colour_fashion import colour_fashion_set
    from transfusion.data import fashion
    from transfusion.evaluate.alignment import score_alignment
    from transfusion.evaluate.classifier import get_classifier
    from transfusion.evaluate.reference import eval_prompts
    from transfusion.images import unpatchify
    from transfusion.metrics import save_image_grid
    from transfusion.tokenizer import Tokenizer

    v = dict(VARIANTS, **dict(kv.split("=", 1) for kv in args.variant))
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer.load(None)
    ds = colour_fashion_set(tk, "train", 28, True)
    model = Lean(tk.vocab_size, v)
    opt = torch.optim.AdamW(model.parameters(), lr=float(v["lr"]), betas=(0.9, 0.95), weight_decay=0.1)
    abar = cosine_abar()
    rng = np.random.default_rng(0)
    B, bf16 = int(v["images"]), v["bf16"] == "1"
    t0, log = time.time(), []
    for step in range(args.steps):
        lr = float(v["lr"]) * min(1, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        idx = rng.integers(len(ds), size=B)
        image_first, drop = rng.random(B) < 0.2, rng.random(B) < 0.1
        tokens, img, lm_t, attn = build_batch(ds, tk, idx, rng, image_first, drop)
        x0 = ds.patches(idx, 4).view(B, 49, 48)
        t = torch.from_numpy(np.where(image_first, rng.integers(0, 501, B), rng.integers(0, 1000, B)))
        eps = torch.randn_like(x0)
        a = abar[t][:, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, e = model(tokens, img, x_t, t, attn)
        lm = F.cross_entropy(logits.float().flatten(0, 1), lm_t.flatten(), ignore_index=-100)
        diff = (e.float() - eps).pow(2).mean()
        loss = lm + 5 * diff
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            log.append({"step": step, "lm": lm.item(), "diff": diff.item(), "s": time.time() - t0})
            print(log[-1], flush=True)
    train_s = time.time() - t0
    model.eval()
    items, colours = eval_prompts(args.n, seed=0, heldout_share=0.25)
    prompts = [fashion.caption(int(i), int(c)) for i, c in zip(items, colours)]
    xs = [sample(model, tk, prompts[k:k + 32], abar, seed=k) for k in range(0, len(prompts), 32)]
    images = unpatchify(torch.cat(xs), 4, 3, 28, 28).clamp(-1, 1)
    save_image_grid(images[:64], out / "grid.png", nrow=8, scale=2)
    summary = score_alignment(images, items, colours, get_classifier()).summary()
    result = {"variant": v, "steps": args.steps, "train_s": train_s, "score": summary, "log": log}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"variant": v, "train_s": round(train_s), **summary}))


if __name__ == "__main__":
    main()
