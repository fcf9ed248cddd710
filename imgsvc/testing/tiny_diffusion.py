"""Build a tiny, randomly initialised Stable-Diffusion inpainting pipeline on disk.

The pipeline has the exact layout of a real `StableDiffusionInpaintPipeline` checkpoint
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), so the
production loader (`imgsvc.models.inpaint.diffusion.DiffusionInpaintEngine`) exercises its real
code path, but every component is a few hundred kB and runs in milliseconds on one CPU thread.
Its output is noise: use it to test plumbing (sizes, determinism, compositing, errors), never
image quality.

Nothing is downloaded: the configs are written here and the tokenizer vocabulary is generated.
The component configs follow diffusers' own test suite
(`tests/pipelines/stable_diffusion/test_stable_diffusion_inpaint.py::get_dummy_components`).
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

#: Native working size of the tiny pipeline: unet.sample_size (32) * vae_scale_factor (2).
TINY_NATIVE_SIZE = 64

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A few merges so the BPE path is exercised, not only single characters.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("o", "n</w>"),
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def write_tiny_clip_tokenizer_files(folder: Path) -> None:
    """Write a CLIP-style `vocab.json` + `merges.txt` covering every byte, so any text tokenizes.

    Vocabulary: the two special tokens, the 256 byte-level characters, the same characters as
    word endings (`x</w>`) and the results of `_MERGES` -- 520 ids, all below the tiny text
    encoder's `vocab_size` of 1000.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {_BOS: 0, _EOS: 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{left} {right}\n" for left, right in _MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")


def build_tiny_inpaint_pipeline(dest: Path, *, seed: int = 0) -> Path:
    """Build a tiny random `StableDiffusionInpaintPipeline` and `save_pretrained` it into `dest`.

    Deterministic for a given `seed` (the global torch RNG state is saved and restored, so callers'
    random streams are not disturbed). Returns `dest`, which then contains `model_index.json`.
    Takes about a second on CPU.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    # Typed as Any: diffusers ships py.typed but its constructors are unannotated.
    diffusers: Any = importlib.import_module("diffusers")

    dest = Path(dest)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            sample_size=32,
            in_channels=9,  # 4 latent + 1 mask + 4 masked-image latent channels
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_NATIVE_SIZE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                projection_dim=32,
                layer_norm_eps=1e-5,
                vocab_size=1000,
                max_position_embeddings=77,
            )
        )
    # The Stable Diffusion v1 scheduler config (scaled-linear betas, PLMS without PRK warm-up).
    scheduler = diffusers.PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return save_inpaint_pipeline(
        dest, vae=vae, text_encoder=text_encoder, unet=unet, scheduler=scheduler
    )


def save_inpaint_pipeline(
    dest: Path, *, vae: Any, text_encoder: Any, unet: Any, scheduler: Any, dtype: Any = None
) -> Path:
    """Assemble an inpainting pipeline around these parts with the tiny CLIP tokenizer (a real
    vocabulary cannot be generated offline), cast it to `dtype` if given, `save_pretrained` it
    into `dest` and return `dest`."""
    from transformers import CLIPTokenizer

    from imgsvc.models.inpaint.single_file import inpaint_pipeline

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
        write_tiny_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True, model_max_length=77)
    pipe = inpaint_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(dest)
    return Path(dest)
