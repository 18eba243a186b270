"""The demo's networks: a pixel-space flow-matching digit teacher (diffusers folder) and a small classifier.

The teacher is an ordinary diffusers model folder (unet/, text_encoder/, tokenizer/, scheduler/) that the
trainer loads like any other (`builtin:mnist`); the classifier is a plain torch module used only by the
metrics.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from .data import DIGIT_WORDS

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
TEACHER_DIR = os.path.join(DEMO_DIR, "teacher")
TEXTURE_TEACHER_DIR = os.path.join(DEMO_DIR, "texture_teacher")
CLASSIFIER_FILE = os.path.join(DEMO_DIR, "classifier.safetensors")
REFERENCE_FILE = os.path.join(DEMO_DIR, "reference.safetensors")
TEXTURE_CLASSIFIER_FILE = os.path.join(DEMO_DIR, "texture_classifier.safetensors")
TEXTURE_REFERENCE_FILE = os.path.join(DEMO_DIR, "texture_reference.safetensors")
IMAGE_SIZE = 28
TOKEN_LENGTH = 8
TEXT_WIDTH = 32
_WORDS = ("a", "handwritten", "digit", "the", "photo", "of", "number") + DIGIT_WORDS


def write_clip_tokenizer(folder: str, words=_WORDS, max_length: int = TOKEN_LENGTH) -> str:
    """A CLIP BPE tokenizer folder whose merges spell each of `words` as one token (characters otherwise)."""
    from ..trainer.tiny_models import write_tiny_clip_tokenizer

    return write_tiny_clip_tokenizer(folder, max_length=max_length, words=words)


def _text_encoder(tokenizer, token_length: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 2, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=token_length, projection_dim=TEXT_WIDTH,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def _pixel_unet(size: int, channels: int, width: int, **extra):
    """The demo teachers' pixel-space UNet: channels (w, 2w, 2w), cross-attention at the coarsest level and in
    the middle block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8, **extra)


def build_teacher_modules(folder: str, seed: int = 0, width: int = 16):
    """Write the tokenizer and scheduler into `folder` and return an untrained (text_encoder, unet, tokenizer).

    UNet: 28x28x1 pixels, channels (w, 2w, 2w), cross-attention only at 7x7 (and in the middle block), so a
    training step costs milliseconds per image on a CPU; flow matching (diffusers FlowMatchEulerDiscrete).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "tokenizer")))
    text_encoder = _text_encoder(tokenizer, TOKEN_LENGTH)
    unet = _pixel_unet(IMAGE_SIZE, 1, width)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000).save_pretrained(os.path.join(folder, "scheduler"))
    return text_encoder, unet, tokenizer


def build_texture_teacher_modules(folder: str, seed: int = 0, width: int = 32):
    """The texture world's teacher, untrained: SD's noise process at 32x32x3 pixels.

    Epsilon prediction on SDXL's scheduler (EulerDiscrete, scaled_linear betas 0.00085..0.012, 1000 steps,
    the same config keys), so every SD code path of the trainer runs on it exactly as for SDXL. UNet channels
    (w, 2w, 2w) at 32/16/8 px, cross-attention at 8 px and in the middle block (attention at 16 px doubled
    the training time on a CPU), and the attention-pooled prompt added to the time embedding
    (`addition_embed_type="text"`), so every ResNet block, the 32 px ones that draw the texture marks too,
    hears the prompt: with cross-attention at 8 px alone the teacher drew the wrong texture (accuracy at
    chance, 0.29, at CFG 5).
    """
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from .texture import IMAGE_SIZE as TEXTURE_SIZE
    from .texture import TOKEN_LENGTH as TEXTURE_TOKENS
    from .texture import WORDS

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(os.path.join(folder, "tokenizer"), words=WORDS, max_length=TEXTURE_TOKENS))
    text_encoder = _text_encoder(tokenizer, TEXTURE_TOKENS)
    unet = _pixel_unet(TEXTURE_SIZE, 3, width, addition_embed_type="text", addition_embed_type_num_heads=2)
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                           ).save_pretrained(os.path.join(folder, "scheduler"))
    return text_encoder, unet, tokenizer


def save_teacher(folder: str, text_encoder, unet, extra: dict, unet_dtype: torch.dtype = torch.float32) -> str:
    """Write the trained modules and a model_index.json carrying the demo's recommended settings.

    `unet_dtype` is the stored precision of the UNet (float16 keeps the texture teacher under the repository's
    5 MB per-file budget; loaders cast back to the dtype they ask for).
    """
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    unet.to(unet_dtype).save_pretrained(os.path.join(folder, "unet"))
    unet.to(torch.float32)
    extra = {**extra, "unet_storage_dtype": str(unet_dtype).removeprefix("torch.")}
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as handle:
        json.dump({"_class_name": "DecoupledDMDDemoTeacher", "_demo": True, **extra}, handle, indent=2)
    return folder


def teacher_info(folder: str = TEACHER_DIR) -> dict:
    """The shipped teacher's model_index.json (guidance scale, training summary)."""
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        return json.load(handle)


class DigitClassifier(nn.Module):
    """A small CNN on 28x28 images in [-1, 1]; `features` (64-d) feed the Frechet distance."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.SiLU(),   # 14
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),   # 7
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 4
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim), nn.SiLU())
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images.float().clamp(-1.0, 1.0))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    def heads(self, features: Tensor) -> dict[str, Tensor]:
        """Logits of each attribute head (one: the digit)."""
        return {"digit": self.head(features)}


class TextureClassifier(nn.Module):
    """The texture world's instrument: a CNN on 32x32 RGB in [-1, 1] with one head per attribute (colour,
    texture, shape, and the unnamed background) and a layout head (the shape's centre and radius, the colour
    jitter: texture.LAYOUT_PARAMETERS), so its 64-d features (the Frechet distance's) carry every factor the
    world varies, not only the four class labels."""

    feature_dim = 64

    def __init__(self):
        from .texture import LAYOUT_PARAMETERS
        from .texture import SCENE_ATTRIBUTES as ATTRIBUTES

        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),             # 32: the texture marks
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),   # 16
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 4
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim), nn.SiLU())
        self.attribute_heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(values))
                                              for name, values in ATTRIBUTES.items()})
        self.layout_head = nn.Linear(self.feature_dim, len(LAYOUT_PARAMETERS))
        # each feature's mean and std on real renders (`calibrate`): the Frechet distance is taken on standardised
        # features, so no handful of high-variance directions decides it (effective rank 13, raw 6)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))

    def features(self, images: Tensor) -> Tensor:
        return self.body(images.float().clamp(-1.0, 1.0))

    def standardize(self, features: Tensor) -> Tensor:
        """Features in units of their spread on real renders (what the Frechet distance compares)."""
        return (features - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def calibrate(self, images: Tensor) -> None:
        """Set the standardisation from real renders (B, 3, 32, 32)."""
        features = torch.cat([self.features(chunk) for chunk in images.split(500)])
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))

    def heads(self, features: Tensor) -> dict[str, Tensor]:
        return {name: head(features) for name, head in self.attribute_heads.items()}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.heads(self.features(images))


def load_classifier(path: str = CLASSIFIER_FILE, architecture: type = DigitClassifier) -> nn.Module:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        script = "train_texture_classifier" if architecture is TextureClassifier else "train_demo_classifier"
        raise FileNotFoundError(f"no classifier weights at {path!r}; run scripts/{script}.py")
    model = architecture()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)
