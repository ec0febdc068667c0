"""Image editing data (paper §4.5): the edit document, a user's edit folder, synthetic colour-fashion recolouring.

An edit document conditions the output image on an instruction and on a clean input image:

    BOS instruction BOI input patches EOI BOI output patches EOI EOS
        input:  clean, x_0 at t = 0 (image_max_t = batch.CLEAN), no diffusion loss: as decoding gives it
        output: diffused like any image, t uniform in [0, T-1]
    instruction dropped (p = data.caption_dropout):   BOS BOI input EOI BOI output EOI EOS
        the unconditional twin of classifier-free guidance: it keeps the input image (editing.py)

LM targets are make_lm_targets' rule: the instruction, its BOI and the EOI -> BOI between the two images are
learnt; nothing is predicted from BOI or from a patch (fn. 8).

Datasets (registry.py); `EditSampler` draws their documents where DocumentSampler draws image-caption ones:
- "edit":     data.folder = DIR holding `edits.jsonl`, one JSON object per line,
              {"input": "in/1.png", "instruction": "make it red", "output": "out/1.png"} (paths relative to DIR).
              A bad line, a missing or unreadable image, an empty or over-long instruction (data.max_caption_tokens)
              is skipped and counted by reason (SkipStats), never silently.
- "recolour": synthetic edits with exact targets: a Fashion-MNIST item in one colour -> the same item in
              another ("make it blue"), tinted by fashion.tint's rule. Split "test" (Fashion-MNIST's test items)
              is the held-out set `transfusion eval --suite edit` scores; training keeps the (item, colour)
              combinations of fashion.HELDOUT out of both images, as colour fashion does.

Recolour edits are drawn on the fly rather than written out as an edit folder: every training item then appears
in all 56 ordered colour pairs and every phrasing (a written set fixes a few per item, or needs millions of
files for all), nothing touches the disk, and the target is exact by construction (the same gray item).
`write_recolour_folder` still writes them in the folder format, to show it and to test the reader on them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from transfusion.batch import CLEAN
from transfusion.config import ConfigError
from transfusion.data import fashion
from transfusion.data.colour_fashion import allowed_colours, load_split
from transfusion.data.dataset import Dataset
from transfusion.data.folder import FolderDatasetError
from transfusion.data.image_text import ImageTextSet, SkipStats, numpy_patchify
from transfusion.data.mixture import DocumentSampler
from transfusion.data.sequences import PATCH, Document, Layout, Specials
from transfusion.images import ImageReadError, read_uint8, resize, to_uint8

EDITS_FILE = "edits.jsonl"
N_COLOURS = len(fashion.COLOUR_NAMES)
# phrasings of a recolour instruction; template 0 is the canonical one (eval, docs)
RECOLOUR_TEMPLATES: tuple[str, ...] = (
    "make it {colour}",
    "turn it {colour}",
    "recolour it {colour}",
    "make it {colour} instead",
    "change the colour to {colour}",
    "paint it {colour}",
)
_NO_TEXT = np.zeros(0, dtype=np.int64)


def recolour_instruction(colour: int, template: int = 0) -> str:
    """e.g. recolour_instruction(5) -> 'make it blue'."""
    return RECOLOUR_TEMPLATES[template].format(colour=fashion.COLOUR_NAMES[colour])


# ------------------------------------------------------------------------------------------ the document


def edit_document(instruction: np.ndarray, input_image: int, output_image: int, n_patches: int, sp: Specials,
                  num_train_steps: int) -> Document:
    """`BOS instruction BOI input EOI BOI output EOI EOS`: the input clean (CLEAN), the output diffused.
    An empty instruction gives the unconditional twin `BOS BOI input EOI BOI output EOI EOS`."""
    patches = np.full(n_patches, PATCH, dtype=np.int64)
    image = [np.array([sp.boi]), patches, np.array([sp.eoi])]
    instr = np.asarray(instruction, dtype=np.int64)
    tokens = np.concatenate([np.array([sp.bos]), instr, *image, *image, np.array([sp.eos])]).astype(np.int64)
    start_in = 1 + len(instr) + 1  # after BOS, instruction, BOI
    start_out = start_in + n_patches + 2  # after the input's patches, EOI, BOI
    return Document(tokens, Layout.EDIT, images=(input_image, output_image), image_starts=(start_in, start_out),
                    max_ts=(CLEAN, num_train_steps - 1))


def edit_document_length(instruction_tokens: int, n_patches: int) -> int:
    """Positions of an edit document: BOS instruction (BOI patches EOI) x 2 EOS."""
    return 6 + 2 * n_patches + instruction_tokens


@dataclass(frozen=True)
class Edit:
    input: int  # image index in the set's store
    output: int
    instruction: np.ndarray  # (n,) int64 token ids, no specials


class EditSet(ABC):
    """Edits over one image store (`images`: inputs and outputs alike, rendered only for a batch's rows)."""

    interleaved: ClassVar[None] = None  # no interleaved-document templates (the loader checks this)

    def __init__(self, images, name: str) -> None:
        self.images = images  # .patches(idx, patch_size) -> (n * patches_per_image, D), like ImageTextSet
        self.name = name

    @abstractmethod
    def __len__(self) -> int:
        """How many edits (or, drawn on the fly, base items) there are to draw from."""

    @abstractmethod
    def draw(self, rng: np.random.Generator) -> Edit: ...

    @abstractmethod
    def max_instruction_len(self) -> int: ...

    def patches(self, idx: np.ndarray, patch_size: int) -> Tensor:
        """collate renders a batch's images through the set, as through an ImageTextSet."""
        return self.images.patches(idx, patch_size)

    def longest_document(self, n_patches: int) -> int:
        return edit_document_length(self.max_instruction_len(), n_patches)


class EditSampler(DocumentSampler):
    """Draws edit documents where DocumentSampler draws image-caption ones; text documents are drawn alike."""

    def image(self) -> Document:
        assert isinstance(self.images, EditSet)
        edit = self.images.draw(self.rng)
        s = self.spec
        dropped = self.rng.random() < s.caption_dropout  # CFG's unconditional mode: no instruction, same input
        doc = edit_document(_NO_TEXT if dropped else edit.instruction, edit.input, edit.output,
                            s.patches_per_image, self.sp, s.num_train_steps)
        self.image_tokens += len(doc)
        return doc


# ------------------------------------------------------------------------------------------ a user's edit folder


class FolderEdits(EditSet):
    """The edits of an edit folder: record m turns image inputs[m] into outputs[m] by instructions[m]."""

    def __init__(self, images: ImageTextSet, inputs: np.ndarray, outputs: np.ndarray,
                 instructions: list[np.ndarray], name: str) -> None:
        super().__init__(images, name)
        self.inputs, self.outputs, self.instructions = inputs, outputs, instructions  # (M,), (M,), M x (n,)

    def __len__(self) -> int:
        return len(self.instructions)

    def draw(self, rng: np.random.Generator) -> Edit:
        m = int(rng.integers(len(self)))
        return Edit(int(self.inputs[m]), int(self.outputs[m]), self.instructions[m])

    def max_instruction_len(self) -> int:
        return max(len(x) for x in self.instructions)


def _parse_edit(line: str) -> tuple[str, str, str] | None:
    """(input, instruction stripped, output) of one edits.jsonl line, or None when it is not such a record."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("input", "output")):
        return None
    instruction = entry.get("instruction")
    return entry["input"], instruction.strip() if isinstance(instruction, str) else "", entry["output"]


def _image_index(root: Path, name: str, size: int, pixels: list[np.ndarray], index_of: dict[str, int]) -> int | str:
    """Index of image `name` in `pixels` (read on first use: an input shared by edits is stored once), or the
    reason to skip its edit."""
    if name in index_of:
        return index_of[name]
    path = root / name
    if not path.is_file():
        return "missing_file"
    try:
        pixels.append(read_uint8(path, size, channels=3))
    except ImageReadError:
        return "unreadable_image"
    index_of[name] = len(pixels) - 1
    return index_of[name]


def load_edit_folder(root: str | Path, tokenizer, image_size: int,
                     max_instruction_tokens: int) -> tuple[FolderEdits, SkipStats]:
    """Read DIR/edits.jsonl and its images -> (FolderEdits, SkipStats). Raises FolderDatasetError."""
    root = Path(root)
    index = root / EDITS_FILE
    if not index.is_file():
        raise FolderDatasetError(f"{index} not found: an edit folder needs {EDITS_FILE} with lines like "
                                 '{"input": "a.png", "instruction": "make it red", "output": "b.png"}')
    stats = SkipStats()
    pixels: list[np.ndarray] = []  # (3, size, size) uint8 each
    index_of: dict[str, int] = {}
    inputs: list[int] = []
    outputs: list[int] = []
    instructions: list[np.ndarray] = []
    for n, line in enumerate(index.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{EDITS_FILE}:{n}"
        parsed = _parse_edit(line)
        if parsed is None:
            stats.skip("bad_line", where)
            continue
        src, text, dst = parsed
        if not text:
            stats.skip("empty_instruction", where)
            continue
        ids = tokenizer.encode(text)
        if len(ids) > max_instruction_tokens:
            stats.skip("instruction_too_long", f"{where} ({len(ids)} > {max_instruction_tokens} tokens)")
            continue
        got = [_image_index(root, name, image_size, pixels, index_of) for name in (src, dst)]
        bad = next((g for g in got if isinstance(g, str)), None)
        if bad is not None:
            stats.skip(bad, f"{where} ({src if isinstance(got[0], str) else dst})")
            continue
        inputs.append(int(got[0]))
        outputs.append(int(got[1]))
        instructions.append(np.asarray(ids, dtype=np.int64))
    stats.used = len(instructions)
    if not instructions:
        raise FolderDatasetError(f"no usable edit in {root}; {stats.summary()}")
    store = ImageTextSet(  # the set's captions are unused: an edit's text is its instruction
        pixels=torch.from_numpy(np.stack(pixels)), caption_of=np.zeros(len(pixels), dtype=np.int64),
        caption_sets=[[]], image_size=image_size, name=f"edit:{root}",
    )
    edits = FolderEdits(store, np.asarray(inputs, dtype=np.int64), np.asarray(outputs, dtype=np.int64),
                        instructions, name=f"edit:{root}")
    return edits, stats


# ------------------------------------------------------------------------------------------ synthetic recolouring


class RecolourImages:
    """Every tint of every item, none stored: image v is item v // 8 tinted colour v % 8, rendered by
    fashion.tint's rule (gray * colour, in [-1, 1]); `patches` computes it in NumPy as TintedImageSet does."""

    def __init__(self, gray: np.ndarray, image_size: int) -> None:
        self.gray = gray  # (N, 28, 28) uint8
        self.image_size = image_size
        self._rgb = fashion.colour_table().numpy()  # (8, 3) float32
        self._resized: np.ndarray | None = None  # (N, S, S) float32 in [0, 1], resized once when S != 28
        if gray.shape[-1] != image_size:
            self._resized = np.concatenate([
                resize(torch.from_numpy(gray[i:i + 4096]).float().div(255.0).unsqueeze(1), image_size)[:, 0].numpy()
                for i in range(0, len(gray), 4096)])

    def __len__(self) -> int:
        return len(self.gray) * N_COLOURS

    def render(self, idx: np.ndarray) -> Tensor:
        """(n, 3, S, S) in [-1, 1]."""
        idx = np.asarray(idx, dtype=np.int64)
        return fashion.tint(self.gray[idx // N_COLOURS], idx % N_COLOURS, self.image_size)

    def patches(self, idx: np.ndarray, patch_size: int) -> Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        item, colour = idx // N_COLOURS, idx % N_COLOURS
        if self._resized is not None:
            g = self._resized[item]
        else:
            g = self.gray[item].astype(np.float32) / np.float32(255.0)  # (n, S, S)
        x = g[:, None] * self._rgb[colour][:, :, None, None]  # (n, 3, S, S), as fashion.tint
        return numpy_patchify(np.clip(x * np.float32(2.0) - np.float32(1.0), -1.0, 1.0), patch_size)


class RecolourEdits(EditSet):
    """Item k in colour a -> item k in colour b != a, both allowed for the item in this split, any phrasing."""

    def __init__(self, images: RecolourImages, labels: np.ndarray, allowed: list[np.ndarray],
                 instructions: list[list[np.ndarray]], name: str) -> None:
        super().__init__(images, name)
        self.labels = labels  # (N,) item class of each base image
        self.allowed = allowed  # per item class, the colour ids an image may have in this split
        self.instructions = instructions  # [target colour][template] -> (n,) token ids

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, rng: np.random.Generator) -> Edit:
        k = int(rng.integers(len(self.labels)))
        src, dst = (int(c) for c in rng.choice(self.allowed[int(self.labels[k])], size=2, replace=False))
        alternatives = self.instructions[dst]
        return Edit(k * N_COLOURS + src, k * N_COLOURS + dst, alternatives[int(rng.integers(len(alternatives)))])

    def max_instruction_len(self) -> int:
        return max(len(x) for alts in self.instructions for x in alts)


def recolour_set(tokenizer, split: str, image_size: int, use_full_dataset: bool) -> RecolourEdits:
    """The recolour edits of a split ("test": Fashion-MNIST's test items, the held-out set); phrasings
    tokenized once."""
    images, labels, _ = load_split(split, use_full_dataset)
    k = len(RECOLOUR_TEMPLATES)
    flat = tokenizer.encode_batch([recolour_instruction(c, j) for c in range(N_COLOURS) for j in range(k)])
    instructions = [[np.asarray(ids, dtype=np.int64) for ids in flat[c * k:(c + 1) * k]] for c in range(N_COLOURS)]
    return RecolourEdits(RecolourImages(np.asarray(images, dtype=np.uint8), image_size), labels,
                         allowed_colours(split), instructions, name=f"recolour/{split}")


@dataclass
class RecolourExamples:
    """Edits with their exact results, for evaluation: (N, 3, S, S) images in [-1, 1], (N,) ids."""

    inputs: Tensor  # the items in their source colours
    targets: Tensor  # the same items in the asked colours: the exact result of the edit
    items: Tensor  # item class of each
    source: Tensor  # colour of each input
    target: Tensor  # colour each instruction asks for
    instructions: list[str]  # the canonical phrasing, "make it blue"


def recolour_examples(split: str = "test", n: int = 80, seed: int = 0, size: int = 28,
                      use_full_dataset: bool = True) -> RecolourExamples:
    """`n` edits of distinct items of `split`: target colours cycle over all 8 (balanced), each input shows its
    item in one of the 7 other colours, drawn by `seed`. The test split allows every colour (HELDOUT restricts
    training only)."""
    gray, labels, _ = load_split(split, use_full_dataset)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(labels), size=min(n, len(labels)), replace=False)
    target = np.arange(len(pick)) % N_COLOURS
    source = (target + rng.integers(1, N_COLOURS, size=len(pick))) % N_COLOURS  # never the target itself
    return RecolourExamples(
        inputs=fashion.tint(gray[pick], source, size), targets=fashion.tint(gray[pick], target, size),
        items=torch.from_numpy(labels[pick]), source=torch.from_numpy(source), target=torch.from_numpy(target),
        instructions=[recolour_instruction(int(c)) for c in target],
    )


def write_recolour_folder(out_dir: str | Path, split: str = "test", n: int = 16, seed: int = 0,
                          size: int = 28, use_full_dataset: bool = True) -> Path:
    """Write `n` recolour edits as an edit folder (PNGs + edits.jsonl): the "edit" format on exact data."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ex = recolour_examples(split, n, seed, size, use_full_dataset)
    lines = []
    for i, (a, b) in enumerate(zip(to_uint8(ex.inputs), to_uint8(ex.targets))):
        Image.fromarray(a).save(out / f"{i:05d}_in.png")
        Image.fromarray(b).save(out / f"{i:05d}_out.png")
        lines.append(json.dumps({"input": f"{i:05d}_in.png", "instruction": ex.instructions[i],
                                 "output": f"{i:05d}_out.png"}))
    (out / EDITS_FILE).write_text("\n".join(lines) + "\n")
    return out


# ------------------------------------------------------------------------------------------ the datasets


class EditFolderDataset(Dataset):
    """A user's edits (`data.folder`): DIR/edits.jsonl + images; the same edits serve both splits."""

    name = "edit"
    document_sampler = EditSampler

    def _root(self) -> Path:
        if not self.data.folder:
            raise ConfigError('data.dataset = "edit" needs data.folder = DIR (images + edits.jsonl)')
        return Path(self.data.folder)

    def image_set(self, tokenizer, split: str, image_size: int, channels: int) -> tuple[FolderEdits, SkipStats]:
        self.require_rgb(channels)
        return load_edit_folder(self._root(), tokenizer, image_size, self.data.max_caption_tokens)

    def sample_prompts(self, n: int) -> list[str]:
        return []  # the trainer's text -> image grid does not show edits

    def describe(self) -> str:
        return f"edit folder {self._root()}"


class RecolourDataset(Dataset):
    """Colour-fashion items re-tinted on instruction, drawn on the fly; scored by `eval --suite edit`."""

    name = "recolour"
    eval_suite = "edit"
    document_sampler = EditSampler

    def image_set(self, tokenizer, split: str, image_size: int, channels: int) -> tuple[RecolourEdits, SkipStats]:
        self.require_rgb(channels)
        edits = recolour_set(tokenizer, split, image_size, self.data.use_full_dataset)
        return edits, SkipStats(used=len(edits))

    def sample_prompts(self, n: int) -> list[str]:
        return []  # the trainer's text -> image grid does not show edits; `transfusion eval --suite edit` does

    def describe(self) -> str:
        source = ("full Fashion-MNIST" if self.data.use_full_dataset and fashion.fashion_dir() is not None
                  else "the committed Fashion-MNIST subset")
        return f"recolour edits: {source}, every item in every ordered pair of colours"
