"""Our side of the benchmarks, run in the project venv; one fresh process per call (clean peak RSS).

    .venv/bin/python benchmarks/ours.py train  --dtype fp32|bf16 [--quick] [--threads N] [--steps S]
    .venv/bin/python benchmarks/ours.py flops  [--quick]       FLOPs of one fp32 training step (FlopCounterMode)
    .venv/bin/python benchmarks/ours.py sample [--quick] [--steps-list 30,250]
    .venv/bin/python benchmarks/ours.py kv     [--quick]       one diffusion step: prefix cached vs recomputed
    .venv/bin/python benchmarks/ours.py mask   [--quick]       training step: Transfusion mask vs causal kernel

Prints one JSON line last. The model is C1 (common.Workload) built from ModelConfig with the public API in
docs/contracts.md; the batch is a MixedBatch of `BOS caption BOI patches EOI text EOS` rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import Workload, emit, median, set_threads, time_calls, workload  # noqa: E402
from transfusion.backends import convert_model  # noqa: E402
from transfusion.backends.cpu.onednn import onednn_linears  # noqa: E402
from transfusion.backends.cpu.runtime import tune_malloc  # noqa: E402
from transfusion.batch import MixedBatch, make_lm_targets  # noqa: E402
from transfusion.config import AttentionMask, ModelConfig, RuntimeConfig  # noqa: E402
from transfusion.diffusion.schedule import NoiseSchedule  # noqa: E402
from transfusion.losses import transfusion_loss  # noqa: E402
from transfusion.model import build as model_build  # noqa: E402
from transfusion.model.transfusion import Transfusion  # noqa: E402

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4
FIRST_TEXT_ID = 5


def model_config(w: Workload, **overrides: Any) -> ModelConfig:
    return ModelConfig(
        dim=w.dim, n_layers=w.n_layers, n_heads=w.n_heads, ffn_hidden=w.ffn_hidden, vocab_size=w.vocab_size,
        image_channels=w.image_channels, image_size=w.image_size, patch_size=w.patch_size,
        max_seq_len=max(4096, 2048 + w.patches), **overrides,
    )


def build_model(w: Workload, converters: str | None = "train", runtime: RuntimeConfig | None = None,
                **overrides: Any) -> Transfusion:
    """The benchmark model through the project's one build path, with the kernel converters the CLI applies:
    "train" as `transfusion train` (oneDNN Linears + CPU math attention), "inference" as `transfusion.load`
    (packed oneDNN + math attention), None for plain PyTorch (the FLOP counter cannot see oneDNN's op)."""
    model = model_build.build_model(model_config(w, **overrides), seed=0)
    if converters is not None:
        convert_model(model, runtime or RuntimeConfig(), inference=converters == "inference")
    return model


def row_layout(length: int, n_images: int, caption: int, n_patches: int) -> tuple[list[int], list[int]]:
    """One document `BOS (caption BOI patches EOI)*n text EOS` of exactly `length`: (kinds, image index).

    kinds: 0 text, 1 special, 2 patch. The text after the last image fills the row.
    """
    kinds, img = [1], [-1]
    for k in range(n_images):
        kinds += [0] * caption + [1] + [2] * n_patches + [1]
        img += [-1] * (caption + 1) + [k] * n_patches + [-1]
    fill = length - len(kinds) - 1
    if fill < 0:
        raise ValueError(f"{n_images} images with {caption}-token captions do not fit a row of {length}")
    kinds += [0] * fill + [1]
    img += [-1] * (fill + 1)
    return kinds, img


def make_batch(w: Workload, rows: int, length: int, n_images: int, caption: int, seed: int = 0) -> MixedBatch:
    """Random token ids and patches in the C1 layout; each row one document; image ids unique in the batch."""
    g = torch.Generator().manual_seed(seed)
    kinds, img = row_layout(length, n_images, caption, w.patches)
    kinds_t, img_t = torch.tensor(kinds), torch.tensor(img)
    tokens = torch.randint(FIRST_TEXT_ID, w.vocab_size, (rows, length), generator=g)
    specials = torch.full((length,), BOI)
    specials[0], specials[-1] = BOS, EOS
    specials[1:][(kinds_t[1:] == 1) & (kinds_t[:-1] == 2)] = EOI  # the special right after an image
    tokens = torch.where(kinds_t == 1, specials, tokens)
    tokens = torch.where(kinds_t == 2, torch.full_like(tokens, PAD), tokens)
    image_ids = torch.where(img_t >= 0, img_t + n_images * torch.arange(rows)[:, None], -1)  # (rows, L)
    doc_ids = torch.zeros(rows, length, dtype=torch.long)
    positions = torch.arange(length).expand(rows, length).contiguous()
    n_img = rows * n_images
    return MixedBatch(
        tokens=tokens, image_ids=image_ids, doc_ids=doc_ids, positions=positions,
        lm_targets=make_lm_targets(tokens, image_ids, doc_ids),
        patches=torch.randn(n_img * w.patches, w.patch_dim, generator=g),
        image_max_t=torch.full((n_img,), 999, dtype=torch.long),
    )


def train_batch(w: Workload) -> MixedBatch:
    return make_batch(w, w.batch, w.row_tokens, 1, w.caption_tokens)


def make_step(model: Transfusion, batch: MixedBatch, bf16: bool, optimizer: bool = True) -> Callable[[], None]:
    """Forward + backward (+ fused AdamW), fp32 or bf16 autocast; no clipping (the peer's step has none).
    The model's converters (build_model) decide the kernels, as in `transfusion train`."""
    schedule = NoiseSchedule(1000)
    gen = torch.Generator().manual_seed(0)
    opt = (torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
           if optimizer else None)  # fused, as transfusion.optim builds it

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            loss = transfusion_loss(model, batch, schedule, generator=gen).loss
            loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return step


def cmd_train(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    model = build_model(w).train()
    step = make_step(model, train_batch(w), bf16=args.dtype == "bf16")
    times = time_calls(step, warmup=args.warmup, iters=args.steps)
    return dict(side="ours", bench="train", dtype=args.dtype, step_s=times, step_s_median=median(times),
                tokens_per_step=w.tokens_per_step, tokens_per_s=w.tokens_per_step / median(times),
                params=model.num_params())


def cmd_flops(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(w, converters=None).train()  # plain PyTorch: the counter cannot see oneDNN's op
    step = make_step(model, train_batch(w), bf16=False)
    step()
    # The counter has no formula for CPU's fused SDPA op: count each call as dense attention (QK^T and AV,
    # 4*B*H*Lq*Lk*hd forward, twice that backward), the convention of PaLM's MFU; mask sparsity not subtracted.
    sdpa_flops = [0]
    orig = F.scaled_dot_product_attention

    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        sdpa_flops[0] += 3 * 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return orig(q, k, v, *a, **kw)

    F.scaled_dot_product_attention = counted
    try:
        with FlopCounterMode(display=False) as fc:
            step()
    finally:
        F.scaled_dot_product_attention = orig
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    counted_sdpa = any("scaled_dot_product" in k for k in by_op)
    total = fc.get_total_flops() + (0 if counted_sdpa else sdpa_flops[0])
    by_op["sdpa (dense, added)"] = 0 if counted_sdpa else sdpa_flops[0]
    return dict(side="ours", bench="flops", flops_per_step=total, flops_by_op=by_op,
                tokens_per_step=w.tokens_per_step, params=model.num_params())


class BenchTokenizer:
    """Fixed ids, so the sampling prefix is exactly `BOS + caption + BOI` of w.prefix_tokens."""

    bos_id, eos_id, boi_id, eoi_id, pad_id = BOS, EOS, BOI, EOI, PAD

    def __init__(self, caption_len: int, vocab: int):
        self.ids = [FIRST_TEXT_ID + (7 * i) % (vocab - FIRST_TEXT_ID) for i in range(caption_len)]

    def encode(self, text: str) -> list[int]:
        return list(self.ids)

    def decode(self, ids: Any) -> str:
        return " ".join(map(str, ids))


def count_calls(module: torch.nn.Module) -> list[int]:
    counter = [0]
    module.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def cmd_sample(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    """Caption -> image: DDIM at `sample_evals` steps, each step one batched cond + uncond call (CFG)."""
    from transfusion.decoding import generate_images

    model = build_model(w, converters="inference").eval()  # as transfusion.load gives it to `sample`
    tok = BenchTokenizer(w.prefix_tokens - 2, w.vocab_size)
    schedule = NoiseSchedule(1000)
    calls = count_calls(model)

    def sample(steps: int, sampler: str) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            return generate_images(model, tok, ["caption"], schedule, steps=steps, cfg_scale=w.cfg_scale,
                                   sampler=sampler, generator=torch.Generator().manual_seed(0), progress=False)

    sample(2, "ddim")  # warm-up
    out: dict[str, Any] = dict(side="ours", bench="sample", dtype=args.dtype)
    for steps in args.steps_list:
        sampler = "ddim" if steps == w.sample_evals else "ddpm"
        iters = args.iters if steps == w.sample_evals else 1
        times, calls[0] = [], 0
        for _ in range(iters):
            t0 = time.perf_counter()
            image = sample(steps, sampler)
            times.append(time.perf_counter() - t0)
        out[f"steps_{steps}"] = dict(
            sampler=sampler, sample_s=times, sample_s_median=median(times), model_calls=calls[0] // iters,
            rows_per_call=2, output=dict(shape=list(image.shape), finite=bool(torch.isfinite(image).all()),
                                         std=float(image.std())))
    return out


def _prefix_and_image(w: Workload, prefix: int) -> tuple[MixedBatch, MixedBatch]:
    """A (1, prefix) text prefix ending in BOI, and the (1, n) image slots that follow it."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(FIRST_TEXT_ID, w.vocab_size, (1, prefix), generator=g)
    tokens[0, 0], tokens[0, -1] = BOS, BOI
    zeros = torch.zeros(1, prefix, dtype=torch.long)
    pre = MixedBatch(tokens, zeros - 1, zeros, torch.arange(prefix)[None], zeros, torch.zeros(0, w.patch_dim),
                     torch.zeros(0, dtype=torch.long))
    n = w.patches
    zn = torch.zeros(1, n, dtype=torch.long)
    img = MixedBatch(zn + PAD, zn, zn, torch.arange(prefix, prefix + n)[None], zn,
                     torch.randn(n, w.patch_dim, generator=g), torch.full((1,), 999))
    return pre, img


def _cat(a: MixedBatch, b: MixedBatch) -> MixedBatch:
    return MixedBatch(*(torch.cat([getattr(a, f), getattr(b, f)], 1 if getattr(a, f).dim() == 2 and f != "patches"
                                  else 0) for f in MixedBatch.__dataclass_fields__))


def _call(model: Transfusion, b: MixedBatch, t: int, **kw: Any) -> Any:
    no_logits = torch.zeros(b.tokens.shape, dtype=torch.bool)
    tt = torch.full((b.patches.shape[0],), t, dtype=torch.long)
    return model(b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches, tt, logits_mask=no_logits, **kw)


@torch.no_grad()  # as the decoder runs (inference-mode parameters would have no version counter to check)
def cmd_kv(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    """Per-step cost of one diffusion step (one row, n patches) with the prefix cached vs recomputed.

    Headline: both under packed oneDNN weights, as the decoder (decoding.py) runs them; `unpacked`: both on
    plain F.linear (MKL), the path a model outside the decoder takes."""
    model = build_model(w, runtime=RuntimeConfig(onednn=False)).eval()  # math attention; oneDNN per mode below
    out: dict[str, Any] = dict(side="ours", bench="kv")
    for prefix in args.prefixes:
        pre, img = _prefix_and_image(w, prefix)
        full = _cat(pre, img)
        res = {}
        for mode in ("packed", "unpacked"):
            with onednn_linears(model, pack=True, enabled=mode == "packed"):
                cache = model.new_cache(1, prefix + w.patches)
                _call(model, pre, 0, cache=cache, commit=True)
                cached = time_calls(lambda: _call(model, img, 500, cache=cache, commit=False), args.warmup,
                                    args.iters)
                recomputed = time_calls(lambda: _call(model, full, 500), args.warmup, args.iters)
            res[mode] = dict(cached_s=median(cached), recompute_s=median(recomputed),
                             speedup=median(recomputed) / median(cached))
        out[f"prefix_{prefix}"] = {**res["packed"], "unpacked": res["unpacked"]}
    return out


def _causal_kernel_sdpa() -> Callable[[], None]:
    """Swap SDPA for its is_causal kernel (no mask tensor): the plain-causal baseline. Returns an undo."""
    orig = F.scaled_dot_product_attention

    def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, **kw: Any) -> torch.Tensor:
        return orig(q, k, v, is_causal=True)

    F.scaled_dot_product_attention = causal

    def undo() -> None:
        F.scaled_dot_product_attention = orig

    return undo


def cmd_mask(args: argparse.Namespace, w: Workload) -> dict[str, Any]:
    """Forward + backward at length L: Transfusion dense mask vs causal dense mask vs SDPA's is_causal kernel."""
    out: dict[str, Any] = dict(side="ours", bench="mask")
    for length in args.lengths:
        rows, n_img = (w.batch, 1) if length < 1000 else (1, max(1, (length - 300) // (w.patches + 62)))
        caption = min(w.caption_tokens, max(1, (length - 3 - n_img * (w.patches + 2)) // (2 * n_img)))
        batch = make_batch(w, rows, length, n_img, caption)
        variants = {"transfusion": AttentionMask.TRANSFUSION, "causal_dense": AttentionMask.CAUSAL,
                    "causal_kernel": AttentionMask.CAUSAL}
        steps = {name: make_step(build_model(w, attention_mask=m).train(), batch, bf16=False, optimizer=False)
                 for name, m in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.warmup + args.iters):  # interleaved, order rotated: drift hits all three alike
            for name in names[i % 3:] + names[: i % 3]:
                undo = _causal_kernel_sdpa() if name == "causal_kernel" else (lambda: None)
                try:
                    t = time_calls(steps[name], 0, 1)[0]
                finally:
                    undo()
                if i >= args.warmup:
                    times[name].append(t)
        res = {name: median(ts) for name, ts in times.items()}
        out[f"L_{length}"] = dict(rows=rows, images_per_row=n_img, step_s=res,
                                  overhead_vs_causal_kernel=res["transfusion"] / res["causal_kernel"] - 1,
                                  overhead_vs_causal_dense=res["transfusion"] / res["causal_dense"] - 1)
    return out


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=["train", "flops", "sample", "kv", "mask", "all"],
                   help="'all' runs every bench in this one process (smoke runs; RSS then not per-bench)")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--steps-list", type=_ints, default=None, help="sampling steps, e.g. 30,250")
    p.add_argument("--prefixes", type=_ints, default=None, help="KV-cache prefixes, e.g. 68,512")
    p.add_argument("--lengths", type=_ints, default=None, help="mask lengths, e.g. 300,2048")
    args = p.parse_args(argv)
    set_threads(args.threads)
    tune_malloc()  # as every transfusion entry point does ([runtime] tune_malloc, backends.setup_process)
    w = workload(args.quick)
    args.steps_list = args.steps_list or ([w.sample_evals] if args.quick else [w.sample_evals, 250])
    args.prefixes = args.prefixes or ([w.prefix_tokens, 24] if args.quick else [68, 512])
    args.lengths = args.lengths or ([40, 200] if args.quick else [300, 2048])
    cmds = dict(train=cmd_train, flops=cmd_flops, sample=cmd_sample, kv=cmd_kv, mask=cmd_mask)
    if args.bench != "all":
        emit(cmds[args.bench](args, w))
        return
    results: dict[str, Any] = {}
    for name, fn in cmds.items():
        for dtype in (["fp32", "bf16"] if name == "train" else [args.dtype]):
            args.dtype = dtype
            results[f"train_{dtype}" if name == "train" else name] = fn(args, w)
    emit(dict(side="ours", bench="all", results=results))


if __name__ == "__main__":
    main()
