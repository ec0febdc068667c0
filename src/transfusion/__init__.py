"""Transfusion (Zhou et al. 2024): one transformer, next-token prediction for text and diffusion for images.

    import transfusion as tf

    m = tf.load("runs/demo")                                   # model + tokenizer + config of a trained run
    images = tf.generate_images(m.model, m.tokenizer, ["a red sneaker"], tf.build_schedule(m.config.diffusion),
                                **tf.sampling_args(m.config.diffusion))   # (1, C, H, W) in [-1, 1]
    print(tf.caption_images(m.model, m.tokenizer, images))     # image -> text

    model = tf.build_model(tf.ModelConfig.from_name("tiny"))   # a fresh model (meta -> to_empty -> init)

Training is `transfusion.train.train(cfg, out_dir)` (the `transfusion train` command): `transfusion.train` is
the package, and no name here shadows a submodule.
"""

from transfusion.config import Config, ModelConfig
from transfusion.config import load as load_config
from transfusion.diffusion import build_schedule
from transfusion.diffusion.schedule import NoiseSchedule
from transfusion.decoding import caption_images, generate, generate_batch, generate_images, sampling_args
from transfusion.inference import load
from transfusion.model.build import build_model
from transfusion.model.transfusion import Transfusion
from transfusion.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["Config", "ModelConfig", "NoiseSchedule", "Tokenizer", "Transfusion", "build_model", "build_schedule",
           "caption_images", "generate", "generate_batch", "generate_images", "load", "load_config",
           "sampling_args"]
