"""Random-weight checkpoints that ComfyUI's own loader accepts, for the tests in this folder and for
make_workflow_pngs.py (no ComfyUI import: they are built in the repo's environment with diffusers/transformers).

    python tests/comfyui/tiny_checkpoints.py sdxl <ComfyUI models/checkpoints>/tiny_sdxl_vega_v1.safetensors
"""

import sys


def _tiny_unet(cross_attention_dim: int, linear: bool):
    """A 320-wide, 2-level UNet: ComfyUI detects SD1.5 (768, conv proj_in) or SD2 (1024, linear) from it."""
    import torch

    from decoupled_dmd.trainer.random_models import build_unet, unet_config

    torch.manual_seed(0)
    return build_unet(unet_config(
        "sd15", sample_size=8, layers_per_block=1, block_out_channels=(320, 320),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, use_linear_projection=linear)).eval()


def build_tiny_sd15(path: str) -> str:
    """Random-weight SD1.5 checkpoint ComfyUI's loader accepts: tiny UNet, full CLIP-L and VAE (fp16)."""
    import torch

    from decoupled_dmd.trainer.formats import write_ldm_checkpoint
    from decoupled_dmd.trainer.random_models import build_text_encoders, build_vae, text_encoder_configs, vae_config

    torch.manual_seed(0)
    clip = build_text_encoders(text_encoder_configs("sd15"))[0].eval()
    vae = build_vae(vae_config("sd15")).eval()
    return write_ldm_checkpoint(path, family="sd15", unet=_tiny_unet(768, False), text_encoders=[clip], vae=vae,
                                prediction_type="epsilon", metadata={"note": "random weights, test only"},
                                overwrite=True, dtype=torch.float16)


def build_tiny_sdxl(path: str) -> str:
    """Random-weight SDXL checkpoint ComfyUI's loader accepts (detected as Segmind Vega, an SDXL variant): a
    320-wide UNet at every level (width, context 2048, ADM 2816, linear proj_in and the input transformer-depth
    list [0,0,1,1,2,2] are what ComfyUI matches; channel multipliers are free), full-size CLIP-L and
    OpenCLIP-G (ComfyUI needs them complete) and the standard VAE, fp16 (~1.9 GB)."""
    import torch

    from decoupled_dmd.trainer.formats import write_ldm_checkpoint
    from decoupled_dmd.trainer.random_models import (
        build_text_encoders,
        build_unet,
        build_vae,
        text_encoder_configs,
        unet_config,
        vae_config,
    )

    torch.manual_seed(0)
    # down levels: no transformer, then 1 and 2 per res block (2 res blocks each) -> [0,0,1,1,2,2];
    # up blocks mirror it, the middle block takes the last level's 2
    unet = build_unet(unet_config("sdxl", sample_size=8, block_out_channels=(320, 320, 320),
                                  transformer_layers=(1, 1, 2), attention_head_dim=5)).eval()
    text_encoders = [encoder.eval() for encoder in build_text_encoders(text_encoder_configs("sdxl"))]
    vae = build_vae(vae_config("sdxl")).eval()
    return write_ldm_checkpoint(path, family="sdxl", unet=unet, text_encoders=text_encoders, vae=vae,
                                prediction_type="epsilon", metadata={"note": "random weights, test only"},
                                overwrite=True, dtype=torch.float16)


def build_tiny_sd2_unet(path: str) -> str:
    """A UNet-only file in SD2 layout (context 1024, linear proj_in): a model family the pack must refuse."""
    from safetensors.torch import save_file

    from decoupled_dmd.trainer.ldm_layout import unet_key_map

    unet = _tiny_unet(1024, True)
    state = unet.state_dict()
    keys = unet_key_map(dict(unet.config), state.keys())
    save_file({keys[k]: v.half().contiguous() for k, v in state.items()}, path)
    return path


if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    print({"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd2_unet": build_tiny_sd2_unet}[kind](out))
