#!/usr/bin/env bash
# One prepared GPU check (issue 5, "GPU"): run on a lent CUDA machine in one short call, never in CI.
#
#   bash benchmarks/gpu.sh            # prints one JSON object; also writes $OUT/gpu.json when $OUT is set
#
# 1. FlexAttention BlockMask == dense-mask SDPA on CUDA (same mask rule, model/masks.py), fp32 and bf16.
# 2. Training steps (forward + backward + AdamW) of the paper's 0.16B config at sequence length 4096, bf16
#    autocast + FlexAttention: eager (flex compiled, as the model does), torch.compile(model), and per-block
#    compile (`train.compile`); the compiled modes again at more rows per step (GPU_BENCH_ROWS_LIST, default
#    4,8); the top CUDA kernels of one mode (GPU_BENCH_PROFILE, default compiled_model) go into "profile".
# 3. tokens/s and MFU = model FLOPs per step / step time / the card's measured bf16 matmul rate. FLOPs: every op
#    but attention counted by FlopCounterMode on an SDPA twin, attention over the mask's allowed pairs only.
#    Goal: >= 45% MFU.
# 4. The trainer path: `transfusion train` on configs/paper/0.16B.toml (colour fashion pixels in 4x4 patches, text
#    mixed in, seq 4096, bf16, FlexAttention, per-block compile as `train.compile` does), GPU_TRAINER_STEPS steps
#    (default 40, 0 skips it) of GPU_TRAINER_ROWS rows (default 8); tokens/s = median of the logged steps after the
#    first 10, MFU against 6 N tokens/s (attention not counted) and the bf16 matmul rate of step 2. Written to
#    "trainer_path" in $OUT/gpu_trainer.json and printed as a second JSON object.
# GPU_ONLY=flex runs step 1 alone. Uses whatever torch the machine has (>= 2.6; the lent machines have 2.11) with src/ on PYTHONPATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export GPU_BENCH_STEPS="${GPU_BENCH_STEPS:-6}" GPU_BENCH_BATCH="${GPU_BENCH_BATCH:-4}"
export GPU_BENCH_MODES="${GPU_BENCH_MODES:-eager_flex,compiled_model,compiled_blocks}"
export GPU_BENCH_ROWS_LIST="${GPU_BENCH_ROWS_LIST:-4,8}" GPU_BENCH_PROFILE="${GPU_BENCH_PROFILE:-compiled_model}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >&2 || true

"$PYTHON" - <<'PYEOF'
import json, os, time
import torch
from torch.utils.flop_counter import FlopCounterMode

from transfusion.config import AttentionImpl, ModelConfig
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.losses import transfusion_loss
from transfusion.model.build import build_model
from common import Workload
from ours import make_batch

assert torch.cuda.is_available(), "gpu.sh needs a CUDA device"
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True
STEPS, ROWS, SEQ = int(os.environ["GPU_BENCH_STEPS"]), int(os.environ["GPU_BENCH_BATCH"]), 4096
MODES = os.environ["GPU_BENCH_MODES"].split(",")
ROWS_LIST = [int(r) for r in os.environ["GPU_BENCH_ROWS_LIST"].split(",")]
PROFILE = os.environ.get("GPU_BENCH_PROFILE", "")  # a result key, e.g. compiled_model: its top CUDA kernels
result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, seq_len=SEQ, rows=ROWS)


def matmul_peak(dtype, n=8192, iters=20):
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def batch_for(cfg, rows, length, n_images, caption):
    w = Workload(vocab_size=cfg.vocab_size, image_size=cfg.image_size, image_channels=cfg.image_channels,
                 patch_size=cfg.patch_size)
    return make_batch(w, rows, length, n_images, caption).to(dev)


def forward(model, b, t, dtype):
    return model(b.tokens, b.image_ids, b.doc_ids, b.positions, b.patches.to(dtype), t)


@torch.no_grad()
def flex_equals_sdpa():
    """fp32 with TF32 off (TF32 alone moves outputs by ~3e-4), and bf16."""
    out = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = ModelConfig.from_name("micro", max_seq_len=512)
    b = batch_for(cfg, 2, 256, 3, 20)
    t = torch.randint(0, 1000, (b.patches.shape[0],), device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        sdpa = build_model(cfg, dev, seed=0).to(dtype).eval()
        flex = build_model(ModelConfig.from_name("micro", max_seq_len=512, attention_impl=AttentionImpl.FLEX), dev)
        flex.load_state_dict(sdpa.state_dict())
        flex = flex.to(dtype).eval()
        a, c = forward(sdpa, b, t, dtype), forward(flex, b, t, dtype)
        err = max((a.logits - c.logits).abs().max().item(), (a.diffusion - c.diffusion).abs().max().item())
        err = float(err)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        out[str(dtype).split(".")[-1]] = dict(max_abs_diff=err, tol=tol, equal=err <= tol)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return out


def train_steps(model, b, steps):
    schedule, gen = NoiseSchedule(1000), torch.Generator(device=dev).manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = transfusion_loss(model, b, schedule, generator=gen).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (flex / model compilation happens here)
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], step


def profile_top(step, n=20):
    """The `n` kernels with the most GPU time over 2 steps: where the non-matmul time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = list(prof.key_averages())

    def dev_time(e):  # microseconds; the attribute was renamed in torch 2.4
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    total = sum(dev_time(e) for e in events) or 1
    top = sorted(events, key=dev_time, reverse=True)[:n]
    return [dict(name=e.key[:160], ms_per_step=dev_time(e) / 2e3, share=dev_time(e) / total) for e in top]


def model_flops(cfg, b):
    """FLOPs of one fwd+bwd step: every op but attention counted by FlopCounterMode on an SDPA twin, plus
    attention over the pairs the Transfusion mask allows (QK^T and PV: 4 * pairs * dim per layer forward, x3
    for forward + backward). Flex skips masked blocks, so counting the dense attention would inflate MFU."""
    from transfusion.model.masks import dense_mask

    model = build_model(ModelConfig.from_name("0.16B", max_seq_len=SEQ), dev)
    schedule, gen = NoiseSchedule(1000), torch.Generator(device=dev).manual_seed(0)
    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", dtype=torch.bfloat16):
        transfusion_loss(model, b, schedule, generator=gen).loss.backward()
    del model
    torch.cuda.empty_cache()
    counts = fc.get_flop_counts()["Global"]
    attn_counted = sum(v for k, v in counts.items() if "attention" in str(k))
    pairs = int(dense_mask(b.image_ids, b.doc_ids).sum())
    attn = 3 * 4 * pairs * cfg.dim * cfg.n_layers
    return fc.get_total_flops() - attn_counted + attn, dict(attention_pairs=pairs, dense_attention_flops=attn_counted,
                                                           masked_attention_flops=attn)


result["flex_equals_sdpa"] = flex_equals_sdpa()
if os.environ.get("GPU_ONLY") == "flex":  # the equality check alone
    print(json.dumps(result, indent=1))
    raise SystemExit(0)
result["matmul_peak_tflops"] = {"bf16": matmul_peak(torch.bfloat16) / 1e12}
cfg = ModelConfig.from_name("0.16B", max_seq_len=SEQ, attention_impl=AttentionImpl.FLEX)
n_img = 12  # 12 x (60 caption + BOI + 256 patches + EOI) + text fill = 4096 per row
b = batch_for(cfg, ROWS, SEQ, n_img, 60)
flops, result["flops_detail"] = model_flops(cfg, b)
result["flops_per_step"] = flops
peak = result["matmul_peak_tflops"]["bf16"] * 1e12
for rows in ROWS_LIST:  # every row has the same layout, so FLOPs scale with the rows
    b = batch_for(cfg, rows, SEQ, n_img, 60)
    for mode in MODES:
        if rows != ROWS and mode == "eager_flex":
            continue
        key = mode if rows == ROWS else f"{mode}_rows{rows}"
        model = build_model(cfg, dev, seed=0).train()
        if mode == "compiled_model":
            model = torch.compile(model)
        elif mode == "compiled_blocks":  # what `train.compile = true` does
            for block in model.layers:
                block.compile()
        try:
            step_s, step = train_steps(model, b, STEPS)
            result[key] = dict(rows=rows, step_s=step_s, tokens_per_s=rows * SEQ / step_s,
                               mfu=flops * rows / ROWS / step_s / peak,
                               max_mem_gb=torch.cuda.max_memory_allocated() / 2**30)
            if PROFILE and key == PROFILE:
                result["profile"] = dict(mode=key, top_kernels=profile_top(step))
        except Exception as e:  # report and carry on: one mode failing must not lose the others' numbers
            result[key] = dict(error=f"{type(e).__name__}: {e}"[:2000])
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
result["params"] = build_model(ModelConfig.from_name("0.16B", max_seq_len=SEQ), "meta").num_params()
text = json.dumps(result, indent=1)
print(text)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu.json"), "w") as f:
        f.write(text)
PYEOF

if [ "${GPU_ONLY:-}" != "flex" ] && [ "${GPU_TRAINER_STEPS:-40}" -gt 0 ]; then
  RUN="$(mktemp -d)/run"
  "$PYTHON" -m transfusion.cli train "$ROOT/configs/paper/0.16B.toml" --out "$RUN" --no-progress \
    --set model.image_channels=3 --set model.image_size=28 --set model.patch_size=4 \
    --set train.steps="${GPU_TRAINER_STEPS:-40}" --set train.batch_size="${GPU_TRAINER_ROWS:-8}" \
    --set train.warmup_steps=5 --set train.compile=true --set train.ckpt_every=0 --set train.sample_n=0 \
    --set train.log_every=1 >&2
  "$PYTHON" - "$RUN" <<'PYEOF'
import json, os, statistics, sys
import torch
from transfusion import config
from transfusion.model.build import build_model
from transfusion.metrics import read_metrics

run = sys.argv[1]
recs = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if r["step"] > 10]
cfg = config.load(os.path.join(run, "config.toml"))
n = build_model(cfg.model, "meta").num_params()
n_dev = torch.cuda.device_count()
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize(); t = __import__("time").perf_counter()
for _ in range(20):
    a @ a
torch.cuda.synchronize(); peak = 2 * 8192**3 * 20 / (__import__("time").perf_counter() - t)
tok_s = statistics.median(r["tokens_per_s"] for r in recs) if recs else None
out = {"trainer_path": dict(command="transfusion train configs/paper/0.16B.toml (see gpu.sh)", params=n,
       steps=len(recs) + 10, rows=cfg.train.batch_size, seq_len=cfg.data.seq_len, tokens_per_s=tok_s,
       mfu_6n=(6 * n * tok_s / peak / n_dev) if tok_s else None, final_loss=recs[-1]["loss"] if recs else None)}
print(json.dumps(out, indent=1))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_trainer.json"), "w") as f:
        json.dump(out, f, indent=1)
PYEOF
fi
