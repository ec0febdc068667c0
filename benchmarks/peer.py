"""The peer's side of the benchmarks: PyPI transfusion-pytorch 0.20.0 (lucidrains), run in `.venv-peer`.

    .venv-peer/bin/python benchmarks/peer.py train  [--quick] [--threads N] [--steps S] [--flops]
    .venv-peer/bin/python benchmarks/peer.py sample [--quick] [--threads N] [--iters I] [--dtype fp32|bf16]

Each call is one fresh process (so its peak RSS is its own) and prints one JSON line last.

C1 built with the peer's own API: `Transformer(dim=384, depth=8, heads=6, dim_head=64)` and its defaults otherwise
(per-token AdaLN conditioning, U-Net skips, attention residuals, gated values, qk-RMSNorm, GEGLU with expansion 4
-> hidden 1024, no patch position embedding). Images go in as channel-last latents (14, 14, 4): its default
`Linear(dim_latent=4 -> dim)` is then exactly a linear patch embedding of 2x2x1 patches. Its text vocab is
`num_text_tokens` plus 3 special, 2 modality and 129 meta ids; we pick num_text_tokens so the embedding has the
same 2048 rows as ours.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from common import Workload, emit, median, set_threads, time_calls, workload  # noqa: E402

PEER_EXTRA_IDS = 3 + 2 + 129  # sos/eos/null + som/eom (one modality) + meta ids


def peer_model(num_text_tokens: int, dim_latent: int, side: int, dim: int, depth: int, heads: int, dim_head: int,
               add_pos_emb: bool = False) -> torch.nn.Module:
    """The peer's Transfusion with its defaults but these sizes (also used by time_to_quality.py)."""
    from loguru import logger
    from transfusion_pytorch import Transfusion

    logger.remove()  # its sampler logs at INFO on every call
    return Transfusion(num_text_tokens=num_text_tokens, dim_latent=dim_latent, modality_default_shape=(side, side),
                       add_pos_emb=add_pos_emb,
                       transformer=dict(dim=dim, depth=depth, dim_head=dim_head, heads=heads))


def build_peer(w: Workload) -> torch.nn.Module:
    return peer_model(w.vocab_size - PEER_EXTRA_IDS, w.patch_dim, w.image_size // w.patch_size, w.dim, w.n_layers,
                      w.n_heads, w.head_dim)


def make_batch(w: Workload, gen: torch.Generator) -> list[list[Any]]:
    """B rows of [caption ids, (14, 14, 4) image latents, text ids]; it adds sos/eos and meta/som/eom itself."""
    n_text = w.vocab_size - PEER_EXTRA_IDS
    side = w.image_size // w.patch_size
    return [
        [
            torch.randint(0, n_text, (w.caption_tokens,), generator=gen),
            torch.randn(side, side, w.patch_dim, generator=gen),
            torch.randint(0, n_text, (w.text_after_tokens,), generator=gen),
        ]
        for _ in range(w.batch)
    ]


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    w = workload(args.quick)
    torch.manual_seed(0)
    model = build_peer(w).train()
    # fused AdamW on both sides (ours: transfusion.optim), so the optimiser implementation is not what differs
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    batch = make_batch(w, torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = time_calls(step, warmup=args.warmup, iters=args.steps)
    out: dict[str, Any] = dict(
        side="peer", bench="train", dtype="fp32", step_s=times, step_s_median=median(times),
        tokens_per_step=w.tokens_per_step, tokens_per_s=w.tokens_per_step / median(times),
        params=sum(p.numel() for p in model.parameters()),
    )
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        out["flops_per_step"] = fc.get_total_flops()
    return out


def count_calls(module: torch.nn.Module) -> list[int]:
    """Count forward calls of `module` (one per network evaluation, cond and uncond counted separately)."""
    counter = [0]

    def hook(*_: Any) -> None:
        counter[0] += 1

    module.register_forward_pre_hook(hook)
    return counter


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    w = workload(args.quick)
    torch.manual_seed(0)
    model = build_peer(w).eval()
    side = w.image_size // w.patch_size
    prompt = torch.randint(0, w.vocab_size - PEER_EXTRA_IDS, (w.caption_tokens,),
                           generator=torch.Generator().manual_seed(1))
    calls = count_calls(model.transformer)
    # torchdiffeq midpoint: 2 evaluations per interval, so S steps over linspace(0, 1, S) = 2 (S - 1) evals.
    steps = w.sample_evals // 2 + 1

    def sample(modality_steps: int) -> list[Any]:
        # force the image right after the caption; max_length=1 stops decoding once the image is done
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            return model.sample_many([prompt.clone()], max_length=1, force_modality_at_start=(0, (side, side)),
                                     modality_steps=modality_steps, cfg_scale=w.cfg_scale,
                                     return_unprocessed_modalities=True)

    sample(2)  # warm-up: beartype/jaxtyping caches, thread pool
    calls[0] = 0
    times: list[float] = []
    result: list[Any] = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        result = sample(steps)
        times.append(time.perf_counter() - t0)
    images = [part for part in result[0] if isinstance(part, tuple) or torch.is_tensor(part) and part.is_floating_point()]
    image = images[-1][1] if isinstance(images[-1], tuple) else images[-1]
    image = image.value if hasattr(image, "value") else image
    return dict(
        side="peer", bench="sample", dtype=args.dtype, sample_s=times, sample_s_median=median(times),
        transformer_calls_per_sample=calls[0] // max(args.iters, 1), ode_steps=steps,
        output=dict(shape=list(image.shape), finite=bool(torch.isfinite(image).all()),
                    mean=float(image.mean()), std=float(image.std())),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["train", "sample"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--flops", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="sample: bf16 autocast or not")
    args = p.parse_args(argv)
    set_threads(args.threads)
    out = cmd_train(args) if args.bench == "train" else cmd_sample(args)
    emit(out)


if __name__ == "__main__":
    main()
