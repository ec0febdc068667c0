"""Packing: document separation, positions restart, images never split, PAD never a target."""

import numpy as np
import torch

from transfusion.batch import IGNORE
from transfusion.data.packing import collate, pack_rows
from transfusion.data.sequences import Layout, Specials, image_document, text_document
from transfusion.images import patchify
from test_data_sequences import N_PATCH, SP, tiny_images


class ScriptedSource:
    """Returns a fixed script of documents, then text fillers of a given size."""

    def __init__(self, docs, filler_len=None):
        self.docs, self.filler_len = list(docs), filler_len

    def next(self, room):
        return self.docs.pop(0) if self.docs else self.text(room)

    def text(self, room):
        if self.filler_len is None or room < 4:
            return None
        return text_document(np.full(min(self.filler_len, room - 2), 9), SP)


def img(k, layout=Layout.CAPTION_FIRST, cap=(11, 12)):
    return image_document(np.array(cap), k, N_PATCH, layout, SP, 1000, 500)


def test_image_is_never_split_and_moves_to_next_row():
    L = 30
    docs = [text_document(np.full(6, 7), SP), img(0), img(1, Layout.IMAGE_FIRST)]  # 8 + 22 + 22 positions
    rows = pack_rows(ScriptedSource(docs), 3, L)
    assert [len(d) for d in rows[0]] == [8, 22]
    assert [d.image for d in rows[1]] == [1]  # did not fit after row 0 was full: starts row 1 whole
    batch = collate(rows, L, SP.pad, tiny_images(), 2)
    batch.validate(patch_dim=12, patches_per_image=N_PATCH, vocab_size=64)
    assert batch.num_images == 2 and batch.image_max_t.tolist() == [999, 500]


def test_doc_ids_positions_and_padding():
    L = 40
    docs = [img(0), text_document(np.arange(5, 10), SP)]  # 22 + 7 = 29, then 11 positions of padding
    batch = collate(pack_rows(ScriptedSource(docs), 1, L), L, SP.pad, tiny_images(), 2)
    batch.validate(patch_dim=12, patches_per_image=N_PATCH, vocab_size=64)
    assert batch.doc_ids[0].tolist() == [0] * 22 + [1] * 7 + [2] * 11
    assert batch.positions[0].tolist() == list(range(22)) + list(range(7)) + list(range(11))
    pad = batch.tokens[0] == SP.pad
    assert pad[29:].all()
    tgt = batch.lm_targets[0]
    assert (tgt[28:] == IGNORE).all()  # EOS of the last doc predicts nothing; padding has no targets
    assert not (tgt == SP.pad).any()  # PAD is never a target anywhere
    # the caption predicts BOI; nothing is predicted from BOI or patches; EOI predicts EOS
    assert tgt[:3].tolist() == [11, 12, SP.boi]
    assert (tgt[3:3 + N_PATCH + 1] == IGNORE).all() and tgt[3 + N_PATCH + 1] == SP.eos
    assert tgt[21] == IGNORE  # EOS -> next document's BOS is not a target (different document)
    assert tgt[22:28].tolist() == [5, 6, 7, 8, 9, SP.eos]


def test_gap_before_a_moved_image_is_filled_with_text():
    L = 30
    docs = [text_document(np.full(10, 7), SP), img(0)]  # 12 + 22 > 30: the image moves, 18 filled with text
    rows = pack_rows(ScriptedSource(docs, filler_len=100), 2, L)
    assert [len(d) for d in rows[0]] == [12, 18] and rows[0][1].layout is Layout.TEXT
    assert rows[1][0].image == 0


def test_text_is_cut_at_row_end():
    docs = [text_document(np.full(50, 7), SP)]
    rows = pack_rows(ScriptedSource(docs), 1, 20)
    assert len(rows[0]) == 1 and len(rows[0][0]) == 20


def test_patches_in_reading_order():
    images = tiny_images(3)
    images.pixels[1] = 255  # image 1 is white, others black
    rows = [[img(1)], [img(0), img(1)]]
    batch = collate(rows, 50, SP.pad, images, 2)
    ref = patchify(images.render(np.array([1, 0, 1])), 2).reshape(-1, 12)
    assert torch.equal(batch.patches, ref)
    assert batch.image_ids[1].max() == 2 and batch.patches[:N_PATCH].min() == 1.0


def test_caption_dropped_documents_teach_no_eos_but_captions_keep_theirs():
    """`BOS BOI image EOI EOS` (caption dropout, for CFG) learns no EOS after its image; an image-first document keeps
    its caption and EOS targets (else greedy captioning learns to write nothing after an image)."""
    L = 60
    rows = [[img(0, Layout.UNCONDITIONAL), img(1, Layout.IMAGE_FIRST)]]
    batch = collate(rows, L, SP.pad, tiny_images(), 2)
    n0 = len(rows[0][0])
    tgt = batch.lm_targets[0]
    assert tgt[0] == SP.boi  # BOS -> BOI: an unconditional document starts an image
    assert (tgt[1:n0] == IGNORE).all()  # patches, and no EOS after EOI
    first = tgt[n0:n0 + len(rows[0][1])]
    assert SP.eos in first.tolist() and 11 in first.tolist() and 12 in first.tolist()
