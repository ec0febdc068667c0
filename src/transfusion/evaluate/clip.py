"""The project's own image–text scorer: a small CLIP-style contrastive model trained on a dataset's training split.

No CLIP weights load offline, so for any dataset with an `image_set` the project trains one: an image CNN and a
text encoder over the shared tokenizer (transfusion.tokenizer), each ending in a unit vector, trained with
symmetric InfoNCE and a learnable temperature (Radford et al. 2021, the pseudocode of Fig. 3). Images are resized to a
fixed `INPUT_SIZE` first, so generated images of any resolution are scored the same way as the real ones.

Many images share one caption (colour fashion: 80 captions for 60k images), so in a batch every pair whose
images come from the same caption set is a positive: the targets of a row are spread over all of them rather
than marking the copies as negatives.

The trained scorer is cached as safetensors + JSON metadata under the cache directory, keyed by the dataset's
name, resolution, a fingerprint of its training split, the hyperparameters and `_VERSION` — never pickled.
Its calibration (`Calibration`: the right caption ranked first among 100 candidates for real test pairs, and for
shuffled pairs, the chance baseline) is measured once and stored with it; text_to_image.clip_metrics scores
generated images with it (`clip_score` = 100 x mean cosine of image and prompt, not clamped at 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transfusion.data.image_text import ImageTextSet
from transfusion.env import cache_dir
from transfusion.evaluate.classifier import flushed_denormals
from transfusion.log import log

_VERSION = 2  # bump when the architecture, preprocessing or training changes, so old caches are not reused
INPUT_SIZE = 32  # every image is scored at 32 x 32 (cheap on CPU; emoji and fashion stay recognisable)
MAX_TOKENS = 32  # longer captions are cut (the text encoder's positions)


@dataclass(frozen=True)
class ClipConfig:
    steps: int = 1500  # ~4 min on 1 thread, ~2.5 min on 2; emoji top-1 of 100: 0.78 at 1,000 steps, 0.83 at 1,500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    width: int = 16  # image CNN channels at full resolution (x2, x4, x8 at 1/2, 1/4, 1/8)
    dim: int = 128  # text model width
    layers: int = 2  # text transformer layers
    embed_dim: int = 128  # joint embedding
    noise_std: float = 0.03  # pixel noise augmentation: generated images are never perfectly clean
    shift: int = 2  # random translation by up to this many pixels (of 32): 6k emoji overfit without it
    pool: int = 2  # the last feature map is average-pooled to pool x pool before the projection
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"v": _VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ImageEncoder(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> (N, embed_dim) unit vectors; `features` gives the pooled map (N, 8w * p * p)."""

    def __init__(self, width: int, embed_dim: int, pool: int) -> None:
        super().__init__()
        w = width
        self.pool = pool

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        # full resolution only for the first (cheap, 3-channel) layer: the CNN costs ~9M MACs per image
        self.net = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),  # (N, 2w, 16, 16)
                                 block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1),  # (N, 4w, 8, 8)
                                 block(4 * w, 8 * w, 2))  # (N, 8w, 4, 4)
        # a coarse pool x pool map rather than one global average: where things are is part of what an image
        # shows, but the full 4x4 map (2,048 features) lets 6k training images be memorised
        self.proj = nn.Linear(8 * w * pool * pool, embed_dim)

    def features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.net(x), self.pool).flatten(1)  # (N, 8w * pool * pool)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.features(x)), dim=-1)


class TextEncoder(nn.Module):
    """(N, T) token ids (0 = pad) -> (N, embed_dim) unit vectors: a small pre-norm transformer, mean-pooled."""

    def __init__(self, vocab: int, dim: int, layers: int, embed_dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(MAX_TOKENS, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def forward(self, ids: Tensor) -> Tensor:
        pad = ids == 0  # (N, T)
        h = self.body(self.tok(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)  # (N, T, dim)
        keep = (~pad).unsqueeze(-1).float()
        h = (self.norm(h) * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (N, dim): mean over real tokens
        return F.normalize(self.proj(h), dim=-1)


class ClipModel(nn.Module):
    def __init__(self, vocab: int, cfg: ClipConfig) -> None:
        super().__init__()
        self.image = ImageEncoder(cfg.width, cfg.embed_dim, cfg.pool)
        self.text = TextEncoder(vocab, cfg.dim, cfg.layers, cfg.embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learnable temperature (CLIP's init)

    def scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()  # CLIP clips the logit scale at 100


def to_clip_input(images: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1], C in {1, 3} -> (N, 3, 32, 32), antialiased bilinear resize."""
    x = images.float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def pad_ids(seqs: list[np.ndarray] | list[list[int]]) -> Tensor:
    """Token id lists -> (N, T) long, 0-padded, cut at MAX_TOKENS (PAD is id 0 in the shared tokenizer)."""
    T = max(1, min(MAX_TOKENS, max((len(s) for s in seqs), default=1)))
    out = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = list(s)[:T]
        out[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


@dataclass
class Calibration:
    """How well the scorer matches real test pairs: the ceiling generated images are measured against."""

    top1_real: float  # right caption ranked first among n_candidates, real test images
    top1_shuffled: float  # the same with a shuffled (mostly wrong) caption as "right": the chance baseline
    cos_real: float  # mean cosine of real pairs
    cos_shuffled: float  # mean cosine of shuffled pairs
    n: int
    n_candidates: int


@dataclass
class ClipScorer:
    """A trained ClipModel with what it was trained with, its calibration and its tokenizer."""

    model: ClipModel
    config: ClipConfig
    tokenizer: object
    calibration: Calibration | None = None
    train_seconds: float = 0.0
    meta: dict = dataclasses.field(default_factory=dict)  # dataset, image size, n_train

    @torch.no_grad()
    def embed_images(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, E) unit vectors."""
        self.model.eval()
        if not len(images):
            return torch.zeros(0, self.config.embed_dim)
        return torch.cat([self.model.image(to_clip_input(b)) for b in images.split(batch_size)])

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 512) -> Tensor:
        """N strings -> (N, E) unit vectors."""
        self.model.eval()
        ids = self.tokenizer.encode_batch(list(texts)) if texts else []
        if not ids:
            return torch.zeros(0, self.config.embed_dim)
        return torch.cat([self.model.text(pad_ids(ids[k : k + batch_size])) for k in range(0, len(ids), batch_size)])

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        """(N, C, H, W) -> (N, E) float64: the image embedding as a feature space (diversity)."""
        return self.embed_images(images).double().numpy()


# --------------------------------------------------------------------------------------------------- training


def _batch_loss(model: ClipModel, images: Tensor, ids: Tensor, groups: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch; every pair of the same caption set counts as a positive."""
    logits = model.scale() * model.image(images) @ model.text(ids).T  # (B, B)
    same = (groups[:, None] == groups[None, :]).float()  # (B, B) positives
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def random_shift(x: Tensor, shift: int, gen: torch.Generator) -> Tensor:
    """(B, C, S, S) -> the same, each image translated by up to `shift` pixels (edges replicated)."""
    if shift <= 0:
        return x
    S = x.shape[-1]
    padded = F.pad(x, (shift,) * 4, mode="replicate")  # (B, C, S + 2 shift, S + 2 shift)
    offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[b, :, dy : dy + S, dx : dx + S] for b, (dy, dx) in enumerate(offsets)])


def _training_batch(images: ImageTextSet, idx: np.ndarray, cfg: ClipConfig, rng: np.random.Generator,
                    gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(images (B, 3, 32, 32), caption ids (B, T), caption-set ids (B,)): a random phrasing per image."""
    x = random_shift(to_clip_input(images.render(idx)), cfg.shift, gen)
    x = (x + cfg.noise_std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    sets = images.caption_of[idx]
    caps = [images.caption_sets[s][rng.integers(len(images.caption_sets[s]))] for s in sets]
    return x, pad_ids(caps), torch.from_numpy(np.asarray(sets))


@flushed_denormals()  # denormals slow CPU training several times; off again afterwards (process-wide state)
def train_clip(images: ImageTextSet, tokenizer, cfg: ClipConfig = ClipConfig(), progress: bool = False,
               max_seconds: float | None = None) -> ClipScorer:
    """Train on an ImageTextSet (the training split), deterministically; stop early after `max_seconds`."""
    start = time.time()
    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = ClipModel(tokenizer.vocab_size, cfg)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
        model.train()
        step = 0
        for step in range(cfg.steps):
            idx = rng.choice(len(images), size=min(cfg.batch_size, len(images)), replace=False)
            loss = _batch_loss(model, *_training_batch(images, idx, cfg, rng, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress and (step + 1) % 250 == 0:
                log.info(f"clip scorer step {step + 1}/{cfg.steps} loss {loss.item():.3f} "
                         f"scale {model.scale().item():.1f}")
            if max_seconds is not None and time.time() - start > max_seconds:
                log.warning(f"clip scorer: stopped after {step + 1} of {cfg.steps} steps ({max_seconds:.0f} s budget)")
                break
    return ClipScorer(model.eval(), cfg, tokenizer, train_seconds=time.time() - start,
                      meta={"dataset": images.name, "image_size": images.image_size, "n_train": len(images),
                            "steps_done": step + 1})


# --------------------------------------------------------------------------------------------------- retrieval


def canonical_captions(images: ImageTextSet, tokenizer) -> list[str]:
    """The first phrasing of every caption set, decoded (index = caption set id)."""
    return [tokenizer.decode(alts[0].tolist()) if len(alts) else "" for alts in images.caption_sets]


def candidate_sets(truth: list[str], pool: list[str], k: int, seed: int) -> list[list[str]]:
    """For each truth caption, `k` candidates: itself plus k - 1 other distinct captions of the pool, drawn by
    `seed`; the whole pool when it has k or fewer captions (chance is then 1 / len(pool))."""
    distinct = sorted(set(pool) | set(truth))
    if len(distinct) <= k:
        return [distinct for _ in truth]
    rng = np.random.default_rng(seed)
    out = []
    for t in truth:
        others = [c for c in (distinct[j] for j in rng.choice(len(distinct), size=k, replace=False)) if c != t]
        out.append([t] + others[: k - 1])
    return out


def retrieval_ranks(scorer: ClipScorer, images: Tensor, truth: list[str], candidates: list[list[str]]) -> Tensor:
    """(N,) rank (0 = first) of truth[i] among candidates[i] by cosine to images[i]; ties count against."""
    img = scorer.embed_images(images)  # (N, E)
    vocab = sorted({c for cs in candidates for c in cs})
    where = {c: j for j, c in enumerate(vocab)}
    txt = scorer.embed_texts(vocab)  # (V, E)
    ranks = torch.zeros(len(truth), dtype=torch.long)
    for i, (t, cs) in enumerate(zip(truth, candidates)):
        sims = img[i] @ txt[[where[c] for c in cs]].T  # (K,)
        ranks[i] = int((sims >= sims[cs.index(t)]).sum()) - 1
    return ranks


def pair_cosine(scorer: ClipScorer, images: Tensor, texts: list[str]) -> Tensor:
    """(N,) cosine between images[i] and texts[i]."""
    return (scorer.embed_images(images) * scorer.embed_texts(texts)).sum(-1)


def calibrate(scorer: ClipScorer, test: ImageTextSet, n: int = 1000, k: int = 100, seed: int = 0) -> Calibration:
    """Retrieval top-1 among `k` candidates on `n` real test pairs, and on the same images with shuffled captions."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(test), size=min(n, len(test)), replace=False)
    pool = canonical_captions(test, scorer.tokenizer)
    truth = [pool[s] for s in test.caption_of[idx]]
    shuffled = [truth[j] for j in rng.permutation(len(truth))]
    images = test.render(idx)
    real_r = retrieval_ranks(scorer, images, truth, candidate_sets(truth, pool, k, seed))
    shuf_r = retrieval_ranks(scorer, images, shuffled, candidate_sets(shuffled, pool, k, seed))
    return Calibration(
        top1_real=float((real_r == 0).float().mean()), top1_shuffled=float((shuf_r == 0).float().mean()),
        cos_real=float(pair_cosine(scorer, images, truth).mean()),
        cos_shuffled=float(pair_cosine(scorer, images, shuffled).mean()),
        n=len(idx), n_candidates=min(k, len(set(pool))),
    )


# --------------------------------------------------------------------------------------------------- cache


def save_scorer(scorer: ClipScorer, path: Path) -> None:
    """Weights as safetensors, everything else as JSON metadata in the same file; atomic publish."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(dataclasses.asdict(scorer.config)), "train_seconds": repr(scorer.train_seconds),
            "meta": json.dumps(scorer.meta), "vocab": str(scorer.tokenizer.vocab_size),
            "calibration": json.dumps(dataclasses.asdict(scorer.calibration) if scorer.calibration else None)}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)  # a concurrent reader never sees half a file


def load_scorer_file(path: Path, tokenizer) -> ClipScorer:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    cfg = ClipConfig(**json.loads(meta["config"]))
    if int(meta["vocab"]) != tokenizer.vocab_size:
        raise ValueError(f"scorer vocabulary {meta['vocab']} != tokenizer's {tokenizer.vocab_size}")
    model = ClipModel(tokenizer.vocab_size, cfg)
    model.load_state_dict(load_file(str(path)))
    cal = json.loads(meta.get("calibration") or "null")
    return ClipScorer(model.eval(), cfg, tokenizer, Calibration(**cal) if cal else None,
                      float(meta.get("train_seconds", 0)), json.loads(meta.get("meta") or "{}"))


def fingerprint(images: ImageTextSet) -> str:
    """A hash of a split's pixels and caption assignment: a changed dataset never reuses a stale scorer."""
    h = hashlib.sha256()
    h.update(images.pixels.numpy().tobytes())
    h.update(np.ascontiguousarray(images.caption_of).tobytes())
    for extra in ("colours",):  # colour fashion stores its tint apart from the gray pixels
        if hasattr(images, extra):
            h.update(getattr(images, extra).numpy().tobytes())
    return h.hexdigest()[:12]


def cache_path(dataset_name: str, image_size: int, train: ImageTextSet, cfg: ClipConfig, root: Path | None) -> Path:
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in dataset_name)
    return (root or cache_dir()) / f"clip-{name}-{image_size}px-{fingerprint(train)}-{cfg.key()}.safetensors"


def get_scorer(dataset, image_size: int, cfg: ClipConfig = ClipConfig(), root: Path | None = None,
               progress: bool = True, tokenizer=None) -> ClipScorer:
    """The cached scorer of `dataset` (a data.dataset.Dataset) at `image_size`, trained and calibrated on first
    use. Raises whatever the dataset raises when it has no image_set (the report turns that into a reason)."""
    from transfusion.tokenizer import Tokenizer

    tok = tokenizer or Tokenizer.load()
    train, _ = dataset.image_set(tok, "train", image_size, 3)
    path = cache_path(dataset.name, image_size, train, cfg, root)
    if path.is_file():
        try:
            return load_scorer_file(path, tok)
        except Exception as e:  # a corrupt or mismatched cache file is retrained, never trusted
            log.warning(f"ignoring unreadable clip scorer cache {path}: {e}")
    if progress:
        log.info(f"training the image-text scorer on {len(train)} {dataset.name} images (cached at {path}) ...")
    scorer = train_clip(train, tok, cfg, progress=progress)
    test, _ = dataset.image_set(tok, "test", image_size, 3)
    scorer.calibration = calibrate(scorer, test)
    if progress:
        c = scorer.calibration
        log.info(f"clip scorer: top-1 of {c.n_candidates} on real test pairs {c.top1_real:.3f} "
                 f"(shuffled {c.top1_shuffled:.3f}) in {scorer.train_seconds:.0f}s")
    save_scorer(scorer, path)
    return scorer
