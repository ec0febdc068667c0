"""The Chameleon baseline (paper §4.1 "Baseline"): images as VQ-VAE codes in the transformer's vocabulary.

    vq.py        the quantiser interface (encode_indices / decode_indices / codebook_size), `load_vq(data.vq)`
    data.py      documents -> token rows (codes offset by model.vocab_size), the code cache, the loader
    decoding.py  text -> image (autoregressive codes, CFG on logits, temperature / top-k) and captioning

The network is model/chameleon.py and the objective losses.chameleon_loss; `model.family = "chameleon"` selects
all of them (docs/sweeps.md).
"""
