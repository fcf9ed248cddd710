"""Export a diffusers Stable-Diffusion pipeline to the original single-file (LDM) layout.

The inverse of diffusers' single-file conversion, written generically from the UNet/VAE configs
so it also works for the tiny test pipeline: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (CLIP text encoder, with or
without the `text_model.` level). Used by tests to check that single-file checkpoints load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if rest.startswith("to_out.0"):
        head, tail = "to_out.0", rest[len("to_out.0.") :]
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """diffusers UNet2DConditionModel state dict → `model.diffusion_model.*` keys."""
    per = config.layers_per_block + 1
    out: dict[str, Any] = {}
    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    up_has_attn = ["CrossAttn" in t for t in config.up_block_types]
    for key, value in state.items():
        parts = key.split(".")
        new = next((v + key[len(k) :] for k, v in fixed.items() if key.startswith(k)), None)
        if new is None and parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.w
                new = f"input_blocks.{(i + 1) * per}.0.op." + ".".join(parts[5:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = "0." + _rename_resnet(rest, _RESNET) if kind == "resnets" else "1." + rest
                new = f"input_blocks.{1 + i * per + j}.{slot}"
        elif new is None and parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}." + _rename_resnet(rest, _RESNET)
            else:
                new = "middle_block.1." + rest
        elif new is None and parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                index = 2 if up_has_attn[i] else 1
                new = f"output_blocks.{i * per + per - 1}.{index}." + ".".join(parts[4:])
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                slot = "0." + _rename_resnet(rest, _RESNET) if kind == "resnets" else "1." + rest
                new = f"output_blocks.{i * per + j}.{slot}"
        if new is None:
            raise ValueError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """diffusers AutoencoderKL state dict → `first_stage_model.*` keys."""
    n = len(config.block_out_channels)
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key.replace("conv_norm_out", "norm_out")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level, stage = (i, "down") if parts[1] == "down_blocks" else (n - 1 - i, "up")
            if parts[3] == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{parts[0]}.{stage}.{level}.block.{parts[4]}.{rest}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sampler = "downsample" if stage == "down" else "upsample"
                new = f"{parts[0]}.{stage}.{level}.{sampler}." + ".".join(parts[5:])
        elif len(parts) > 2 and parts[1] == "mid_block":
            j, rest = int(parts[3]), ".".join(parts[4:])
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{j + 1}.{rest}"
            else:
                new = f"{parts[0]}.mid.attn_1." + _rename_resnet(rest, _VAE_ATTN)
                if value.ndim == 2:  # linear → 1x1 conv
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, Any], *, with_text_model: bool) -> dict[str, Any]:
    """CLIPTextModel state dict → `cond_stage_model.transformer.[text_model.]*` keys."""
    out = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        inner = "text_model." + bare if with_text_model else bare
        out["cond_stage_model.transformer." + inner] = value
    return out


def export_single_file(pipeline_dir: Path, dest: Path, *, with_text_model: bool = True) -> Path:
    """Load the diffusers folder `pipeline_dir` and write one LDM-layout `.safetensors` file."""
    import importlib

    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    diffusers: Any = importlib.import_module("diffusers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    vae = diffusers.AutoencoderKL.from_pretrained(pipeline_dir / "vae")
    text = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", local_files_only=True)
    state = {
        **unet_to_ldm(unet.state_dict(), unet.config),
        **vae_to_ldm(vae.state_dict(), vae.config),
        **clip_to_ldm(text.state_dict(), with_text_model=with_text_model),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest))
    return dest
