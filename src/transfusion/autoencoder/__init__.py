"""The project's own image autoencoders (paper §2.3, App. A): a KL-VAE for Transfusion's continuous latents and
its VQ-VAE twin for the Chameleon baseline, the same CNN encoder/decoder, trained by `transfusion train-vae`.

    from transfusion.autoencoder import load_autoencoder
    ae = load_autoencoder("runs/vae_kl")      # run or step directory
    z = ae.encode(images)                      # (N, 3, H, W) in [-1, 1] -> (N, C, H/f, W/f), ~unit variance
    x = ae.decode(z)
    ae.encode_indices(images)                  # VQ: (N, H/f, W/f) long codes; decode_indices inverts
    vq = load_vq("runs/vae_vq")               # load_autoencoder + a check that it is a VQ-VAE

Latents of a whole dataset split: autoencoder.cache.dataset_latents (cached per VAE fingerprint).
See docs/autoencoder.md.
"""

from transfusion.autoencoder.checkpoint import load_autoencoder, load_vq
from transfusion.autoencoder.model import Autoencoder, AutoencoderError

__all__ = ["Autoencoder", "AutoencoderError", "load_autoencoder", "load_vq"]
