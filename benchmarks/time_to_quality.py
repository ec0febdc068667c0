"""Time-to-quality against the peer (issue 12 §4): wall time of training until text -> image samples reach a
target item + colour score, ours vs transfusion-pytorch 0.20.0 on the same colour-fashion data, one run.

    python benchmarks/time_to_quality.py --out runs/ttq [--peer-minutes 24] [--n 64] [--target 0.60]

Ours: `transfusion train configs/tiny.toml` (the demo config) with a checkpoint every `--ours-every` steps kept;
each checkpoint is sampled (its DDIM 50 with CFG 3: 100 network evaluations per image, cond + uncond) and scored.
The x axis is the trainer's `train_s` (wall seconds in optimiser steps, saves excluded).

Peer: its own defaults (`add_pos_emb=True`, flow matching, AdamW 3e-4, caption dropout 0.1 built in) with the
model width of benchmarks/peer.py, trained on the same tinted images and captions (exported once from our
dataset to an .npz, 4x4 pixel patches as a (7, 7, 48) latent grid) in `.venv-peer`, snapshotting its weights
every `--peer-every` minutes of training time. Each snapshot is sampled one image at a time (its batched
sampler drops the position embedding) with CFG 3 and as many network evaluations per image as ours: midpoint
ODE steps S -> 2 (S - 1) evaluations, each a cond and an uncond pass, so S = 26 for 100.

Both sides' images are scored here by the evaluation suite's item classifier + colour reader on the same
prompts (`eval_prompts(n, heldout_share=0.25)`). Writes OUT/time_to_quality.json and prints it.
The peer subcommands (`peer-train`, `peer-sample`) run inside `.venv-peer` and import nothing of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEER_PY = ROOT / ".venv-peer" / "bin" / "python"
GRID, PATCH = 7, 48  # 28x28 RGB in 4x4 patches


# ------------------------------------------------------------------------------ peer side (.venv-peer)


def build_peer(vocab: int):
    from peer import peer_model  # benchmarks/peer.py: the one place the peer model is built

    return peer_model(vocab, PATCH, GRID, dim=256, depth=8, heads=4, dim_head=64, add_pos_emb=True)


def peer_train(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    d = np.load(args.data)
    patches, caps, cap_len = d["patches"], d["captions"], d["caption_len"]  # (N, 49, 48) u8, (N, Lc), (N,)
    model = build_peer(int(d["vocab"])).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_s, next_snap, step, snaps = 0.0, args.every * 60, 0, []
    while train_s < args.minutes * 60:
        t0 = time.perf_counter()
        idx = rng.integers(len(patches), size=args.batch)
        batch = [[torch.from_numpy(caps[i, :cap_len[i]]).long(),
                  torch.from_numpy(patches[i].astype(np.float32) / 127.5 - 1.0).view(GRID, GRID, PATCH)]
                 for i in idx]
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        train_s += time.perf_counter() - t0
        if step % 10 == 0:
            print(json.dumps({"step": step, "loss": float(loss), "train_s": round(train_s, 1)}), flush=True)
        if train_s >= next_snap or train_s >= args.minutes * 60:
            path = out / f"peer_{step:06d}.pt"
            torch.save(model.state_dict(), path)
            snaps.append({"step": step, "train_s": train_s, "path": str(path)})
            next_snap += args.every * 60
    (out / "peer_snapshots.json").write_text(json.dumps(snaps, indent=1))


def peer_sample(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    d = np.load(args.prompts)
    model = build_peer(int(d["vocab"])).eval()
    model.load_state_dict(torch.load(args.ckpt, weights_only=True))
    images = []
    for k in range(len(d["caption_len"])):
        torch.manual_seed(k)
        prompt = torch.from_numpy(d["captions"][k, :d["caption_len"][k]]).long()
        result = model.sample_one(prompt, max_length=1, force_modality_at_start=(0, (GRID, GRID)),
                                  modality_steps=args.steps, cfg_scale=3.0, return_unprocessed_modalities=True)
        parts = [p for p in result if isinstance(p, tuple) or torch.is_tensor(p) and p.is_floating_point()]
        img = parts[-1][1] if isinstance(parts[-1], tuple) else parts[-1]
        images.append(torch.as_tensor(getattr(img, "value", img)).float().reshape(GRID * GRID, PATCH))
    np.save(args.out, torch.stack(images).numpy())


# ------------------------------------------------------------------------------ orchestration (our venv)


def export_data(out: Path, n_prompts: int) -> tuple[Path, Path, object, object]:
    """The training set as the peer reads it, and the scored prompts' captions."""
    import torch

    from transfusion.data import fashion
    from transfusion.data.colour_fashion import colour_fashion_set
    from transfusion.evaluate.reference import eval_prompts
    from transfusion.images import patchify
    from transfusion.tokenizer import Tokenizer

    tk = Tokenizer.load(None)
    items, colours = eval_prompts(n_prompts, seed=0, heldout_share=0.25)
    data, prompts = out / "peer_data.npz", out / "peer_prompts.npz"
    if data.exists() and prompts.exists() and len(np.load(prompts)["caption_len"]) == n_prompts:
        return data, prompts, items, colours  # exported by an earlier (interrupted) run
    ds = colour_fashion_set(tk, "train", 28, True)
    patches = np.concatenate([
        patchify(ds.render(np.arange(i, min(i + 4096, len(ds)))), 4).add(1).mul(127.5).round().clamp(0, 255)
        .to(torch.uint8).numpy() for i in range(0, len(ds), 4096)])  # (N, 49, 48) uint8
    rng = np.random.default_rng(0)
    caps = [ds.caption_sets[c][rng.integers(len(ds.caption_sets[c]))] for c in ds.caption_of]
    _save_captions(data, caps, tk.vocab_size, patches=patches)
    _save_captions(prompts, [np.asarray(tk.encode(fashion.caption(int(i), int(c))))
                             for i, c in zip(items, colours)], tk.vocab_size)
    return data, prompts, items, colours


def _save_captions(path: Path, caps: list, vocab: int, **extra) -> None:
    L = max(len(c) for c in caps)
    arr = np.zeros((len(caps), L), dtype=np.int64)
    for i, c in enumerate(caps):
        arr[i, :len(c)] = c
    np.savez(path, captions=arr, caption_len=np.array([len(c) for c in caps]), vocab=vocab, **extra)


def score_images(images, items, colours) -> dict:
    from transfusion.evaluate.alignment import score_alignment
    from transfusion.evaluate.classifier import get_classifier

    return score_alignment(images.clamp(-1, 1), items, colours, get_classifier(progress=False)).summary()


def run_ours(out: Path, args, items, colours) -> list[dict]:
    import torch

    from transfusion.evaluate.report import generate_for_prompts
    from transfusion.inference import load

    run = out / "ours"
    if not (run / "checkpoints").exists():
        cli = str(Path(sys.executable).parent / "transfusion")
        subprocess.run([cli, "train", "configs/tiny.toml", "--out", str(run),
                        "--set", f"train.ckpt_every={args.ours_every}", "--set", "train.keep_checkpoints=0",
                        "--set", "train.time_limit_min=0"], check=True, cwd=ROOT)
    cache = out / "ours_points.json"  # scoring is deterministic (fixed seeds): reuse it on a rerun
    if cache.exists():
        return json.loads(cache.read_text())
    points = []
    for ck in sorted((run / "checkpoints").glob("step_*")):
        m = load(ck)
        state = json.loads((ck / "train_state.json").read_text())["train_state"]["trainer"]
        d = m.config.diffusion
        with torch.no_grad():
            imgs = generate_for_prompts(m.model, m.tokenizer, m.config, items, colours, d.sample_steps,
                                        d.cfg_scale, d.sampler.value, seed=0, batch=len(items), progress=False)
        points.append({"step": state["step"], "train_s": state["train_s"], **score_images(imgs, items, colours)})
        print(json.dumps({"ours": points[-1]}), flush=True)
    cache.write_text(json.dumps(points, indent=1))
    return points


def run_peer(out: Path, args, data: Path, prompts: Path, items, colours) -> list[dict]:
    import torch

    from transfusion.images import unpatchify

    snaps_file = out / "peer" / "peer_snapshots.json"
    if not snaps_file.exists():
        subprocess.run([str(PEER_PY), __file__, "peer-train", "--data", str(data), "--out", str(out / "peer"),
                        "--minutes", str(args.peer_minutes), "--every", str(args.peer_every)], check=True)
    points = []
    snaps = json.loads(snaps_file.read_text())[::-1]  # newest first: the peer's best is usually its last
    for snap in snaps[:args.peer_snapshots or None]:
        npy = Path(snap["path"]).with_suffix(".npy")
        if not npy.exists():
            subprocess.run([str(PEER_PY), __file__, "peer-sample", "--ckpt", snap["path"], "--prompts",
                            str(prompts), "--out", str(npy), "--steps", str(args.peer_ode_steps)], check=True)
        patches = torch.from_numpy(np.load(npy)).float()  # (n, 49, 48), the peer's output in [-1, 1] space
        imgs = unpatchify(patches, 4, 3, 28, 28)
        points.append({"step": snap["step"], "train_s": snap["train_s"], **score_images(imgs, items, colours)})
        print(json.dumps({"peer": points[-1]}), flush=True)
    return points


def first_reaching(points: list[dict], target: float) -> float | None:
    hit = [p["train_s"] for p in sorted(points, key=lambda p: p["train_s"]) if p["both"] >= target]
    return hit[0] if hit else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run")
    r.add_argument("--out", default="runs/ttq")
    r.add_argument("--n", type=int, default=64, help="prompts scored per checkpoint (a quarter held out)")
    r.add_argument("--target", type=float, default=0.60)
    r.add_argument("--ours-every", type=int, default=90)
    r.add_argument("--peer-minutes", type=float, default=24.0)
    r.add_argument("--peer-every", type=float, default=4.0)
    r.add_argument("--peer-ode-steps", type=int, default=26)
    r.add_argument("--peer-snapshots", type=int, default=0,
                   help="score only the newest K peer snapshots (0: all); its one-at-a-time sampler is slow")
    t = sub.add_parser("peer-train")
    for a in ("--data", "--out"):
        t.add_argument(a, required=True)
    t.add_argument("--minutes", type=float, default=24.0)
    t.add_argument("--every", type=float, default=4.0)
    t.add_argument("--batch", type=int, default=48, help="images per step (ours: ~48 at 32 rows of 128)")
    t.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    s = sub.add_parser("peer-sample")
    for a in ("--ckpt", "--prompts", "--out"):
        s.add_argument(a, required=True)
    s.add_argument("--steps", type=int, default=26)
    s.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    args = p.parse_args(argv)
    if args.cmd == "peer-train":
        peer_train(args)
        return 0
    if args.cmd == "peer-sample":
        peer_sample(args)
        return 0
    if args.cmd != "run":
        p.error("choose run, peer-train or peer-sample")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, prompts, items, colours = export_data(out, args.n)
    ours = run_ours(out, args, items, colours)
    peer = run_peer(out, args, data, prompts, items, colours)
    t_ours, t_peer = first_reaching(ours, args.target), first_reaching(peer, args.target)
    result = {
        "target_both": args.target, "n_prompts": args.n, "network_evals_per_image": 100,
        "time_to_quality_s": {"ours": t_ours, "peer": t_peer},
        "time_to_quality_speedup_vs_peer": (t_peer / t_ours) if t_ours and t_peer else None,
        "peer_reached": t_peer is not None, "peer_best_both": max(q["both"] for q in peer),
        "peer_budget_s": args.peer_minutes * 60,
        "peer_snapshots_scored": sorted(q["step"] for q in peer),
        "note": ("only the newest peer snapshots were scored (--peer-snapshots): a peer time-to-quality found "
                 "among them is an upper bound") if args.peer_snapshots else "",
        "ours": ours, "peer": peer,
    }
    (out / "time_to_quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("ours", "peer")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
