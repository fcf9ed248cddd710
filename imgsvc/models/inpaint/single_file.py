"""Single-file inpainting checkpoints (`weights/diffusers/<name>.safetensors`), fully offline.

A single file holds the weights in the original (LDM/CompVis) layout but no configs, and
diffusers' `from_single_file` fetches those from the Hub unless it is given a local folder. So
the configs come from a local folder: `weights/diffusers/<name>.config/` when the user provides
one (any architecture whose text encoder is CLIP, e.g. the output of `save_pretrained` without
its weights), otherwise the published Stable Diffusion 1.5 inpainting configs below, written to
a temporary folder when the checkpoint has that architecture's shapes (9-channel UNet, 768-wide
CLIP text encoder).

The CLIP tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`) is not in a checkpoint
and cannot be generated: it is taken from `<name>.config/tokenizer/`,
`weights/diffusers/tokenizer/` or the `tokenizer/` of any installed diffusers pipeline folder
(all SD 1.x models share it).

Text-encoder keys are accepted with and without the `text_model.` level (transformers 5
flattened `CLIPTextModel`, and checkpoints exported with it lack that level); they are mapped to
whatever the installed transformers expects and loaded strictly, so a wrong file fails loudly
instead of leaving random weights.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

from imgsvc.errors import ModelUnavailable

CONFIG_SUFFIX = ".config"
#: Either file set is a complete CLIP tokenizer (transformers 5 saves only tokenizer.json).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
_UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
_CLIP_POS = "embeddings.position_embedding.weight"


def sd15_inpaint_configs() -> dict[str, dict[str, Any]]:
    """The component configs of `stable-diffusion-v1-5/stable-diffusion-inpainting`.

    Keys: "unet", "vae" (diffusers model configs), "text_encoder" (transformers CLIPTextConfig
    of openai/clip-vit-large-patch14's text tower) and "scheduler" (PNDM, as shipped).
    """
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 9,  # 4 latent + 1 mask + 4 masked-image latent channels
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": 64,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": 512,
            "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
        "text_encoder": {
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": 768,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "projection_dim": 768,
            "vocab_size": 49408,
        },
        "scheduler": {
            "_class_name": "PNDMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
        },
    }


def find_checkpoints(weights_dir: Path) -> dict[str, Path]:
    """Every `weights_dir/diffusers/<name>.safetensors`, by name (sorted)."""
    root = Path(weights_dir) / "diffusers"
    if not root.is_dir():
        return {}
    found = {
        p.stem: p
        for p in root.iterdir()
        if p.is_file() and p.suffix == ".safetensors" and not p.name.startswith(".")
    }
    return dict(sorted(found.items()))


def write_config_folder(dest: Path, configs: dict[str, dict[str, Any]]) -> Path:
    """Write `configs` (as `sd15_inpaint_configs` returns) in the diffusers folder layout."""
    names = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}
    names["scheduler"] = "scheduler_config.json"
    for component, config in configs.items():
        folder = dest / component
        folder.mkdir(parents=True, exist_ok=True)
        (folder / names[component]).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dest


def _tokenizer_dir(path: Path) -> Path:
    candidates = [
        path.with_name(path.stem + CONFIG_SUFFIX) / "tokenizer",
        path.parent / "tokenizer",
        *sorted(p / "tokenizer" for p in path.parent.iterdir() if p.is_dir()),
    ]
    for folder in candidates:
        if any(all((folder / n).is_file() for n in names) for names in TOKENIZER_FILES):
            return folder
    raise ModelUnavailable(
        f"{path.name} needs the CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt): "
        f"put it in "
        f"{path.parent / 'tokenizer'}/ (the tokenizer/ folder of any SD 1.x pipeline)"
    )


def _is_sd15_inpaint(checkpoint: dict[str, Any]) -> bool:
    unet_in = checkpoint.get(_UNET_IN)
    pos = checkpoint.get(CLIP_PREFIX + "text_model." + _CLIP_POS)
    return (
        unet_in is not None
        and tuple(unet_in.shape[:2]) == (320, 9)
        and pos is not None
        and tuple(pos.shape) == (77, 768)
    )


def normalize_clip_keys(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`cond_stage_model.transformer.*` keys, always with the `text_model.` level."""
    out = {}
    for key, value in checkpoint.items():
        if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + "text_model."):
            key = CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX) :]
        out[key] = value
    return out


def _load_text_encoder(checkpoint: dict[str, Any], config_dir: Path, dtype: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, local_files_only=True))
    wrapped = hasattr(model, "text_model")  # transformers < 5.6 keeps the `text_model` level
    prefix = CLIP_PREFIX + ("" if wrapped else "text_model.")
    wanted = model.state_dict()
    state = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    # position_ids is a buffer some exporters include and others do not.
    state = {k: v for k, v in state.items() if k in wanted or not k.endswith("position_ids")}
    missing = sorted(set(wanted) - set(state) - {k for k in wanted if k.endswith("position_ids")})
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ModelUnavailable(
            f"the text encoder in the checkpoint does not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval()


def load_pipeline(path: Path, *, dtype: Any) -> Any:
    """A `StableDiffusionInpaintPipeline` from a single `.safetensors` file, on the CPU."""
    from safetensors.torch import load_file

    diffusers: Any = importlib.import_module("diffusers")
    try:
        checkpoint = normalize_clip_keys(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelUnavailable(f"cannot read {path}: {exc}") from exc
    if _UNET_IN not in checkpoint or not any(k.startswith(CLIP_PREFIX) for k in checkpoint):
        raise ModelUnavailable(
            f"{path.name} is not a Stable Diffusion checkpoint in the original layout "
            f"(no {UNET_PREFIX}* or {CLIP_PREFIX}* weights)"
        )
    sidecar = path.with_name(path.stem + CONFIG_SUFFIX)
    tokenizer_dir = _tokenizer_dir(path)
    with tempfile.TemporaryDirectory(prefix="imgsvc-sd-config-") as tmp:
        if sidecar.is_dir():
            config_dir = sidecar
        elif _is_sd15_inpaint(checkpoint):
            config_dir = write_config_folder(Path(tmp), sd15_inpaint_configs())
        else:
            raise ModelUnavailable(
                f"{path.name} is not a Stable Diffusion 1.5 inpainting checkpoint (9-channel "
                f"UNet, CLIP ViT-L text encoder); put its diffusers configs in {sidecar}/"
            )
        common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
        try:
            unet = diffusers.UNet2DConditionModel.from_single_file(
                checkpoint, subfolder="unet", **common
            )
            vae = diffusers.AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **common)
            text_encoder = _load_text_encoder(checkpoint, config_dir / "text_encoder", dtype)
            scheduler_config = json.loads(
                (config_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
            )
            scheduler_cls = getattr(diffusers, scheduler_config["_class_name"])
            scheduler = scheduler_cls.from_config(scheduler_config)
            tokenizer = importlib.import_module("transformers").CLIPTokenizer.from_pretrained(
                tokenizer_dir,
                local_files_only=True,
                model_max_length=text_encoder.config.max_position_embeddings,
            )
        except ModelUnavailable:
            raise
        except Exception as exc:  # shapes that do not fit the config, unreadable configs...
            raise ModelUnavailable(f"cannot load {path.name} with {config_dir}: {exc}") from exc
    return inpaint_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


def inpaint_pipeline(
    *, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any
) -> Any:
    """A Stable Diffusion inpainting pipeline of these parts, without a safety checker."""
    diffusers: Any = importlib.import_module("diffusers")
    return diffusers.StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
