"""Tiny diffusers pipelines with random weights, built from configs and saved with ``save_pretrained``
(safetensors), so tests load them through exactly the path a user's real checkpoint takes.

The CLIP tokenizer gets a hand-written byte-level vocabulary (every byte character, alone and as
a word end ``</w>``, plus a few merges): nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from _eval_models import _bytes_to_unicode


MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]


def write_clip_tokenizer(folder: Path, max_length: int = 16) -> Path:
    """vocab.json + merges.txt + tokenizer_config.json for a byte-level CLIPTokenizer."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return folder


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8,
                       cross_dim: int = 32) -> dict:
    """UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + AutoencoderKL + DDIM scheduler, random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp)))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=cross_dim, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tok, "scheduler": sched}


def tiny_sd_pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny StableDiffusionPipeline saved in ``folder`` (model_index.json + safetensors); the folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def random_unet_lora(pipe_folder: Path, out: Path, rank: int = 4, seed: int = 1, scale: float = 0.5) -> Path:
    """A LoRA adapter on the pipeline's UNet attention projections with random (nonzero) B, saved by
    diffusers' save_lora_weights (the diffusers/peft format load_lora_weights reads); the file."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipe_folder, subfolder="unet", use_safetensors=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return Path(out) / "pytorch_lora_weights.safetensors"


def tiny_sd3_pipeline(folder: Path, seed: int = 0, patch_size: int = 1) -> Path:
    """A toy StableDiffusion3Pipeline (SD3Transformer2DModel, two CLIP text encoders with projection,
    no T5, flow-matching scheduler, a 4-channel AutoencoderKL with a shift factor), saved in ``folder``."""
    import tempfile

    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.06, scaling_factor=1.5,
                        use_quant_conv=False, use_post_quant_conv=False)
    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp)))

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=32, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = Path(folder) / "model_index.json"  # the absent T5, recorded as diffusers records a None component
    mi = json.loads(index.read_text())
    mi.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    index.write_text(json.dumps(mi, indent=2))
    return Path(folder)


def trained_tiny_sd_pipeline(folder: Path, steps: int = 150, n_images: int = 64, seed: int = 0,
                             batch_size: int = 16, lr: float = 2e-3) -> Path:
    """A tiny StableDiffusionPipeline whose UNet has a real probability-flow ODE: the random VAE's
    ``scaling_factor`` set so the latents of ``n_images`` embedded-world scenes (16 px) have unit
    std, then the UNet trained ``steps`` steps (full weights, eps objective, 10% empty captions) on
    those latents and their captions.  (A random UNet predicts eps ~ 0 and its ODE paths leave the
    latents' scale: nothing to distil.)  Saved with save_pretrained; the folder."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from imagegen.world.scene import WorldConfig, render_scene

    comps = tiny_sd_components(seed)
    unet, vae, text, tok, sched = (comps[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    world = WorldConfig()
    imgs, caps = [], []
    for i in range(n_images):
        scene, image = render_scene(world, i)
        a = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32) / 127.5 - 1
        imgs.append(torch.from_numpy(a).permute(2, 0, 1))
        caps.append(scene.caption)
    with torch.no_grad():
        z = vae.encode(torch.stack(imgs)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        z = z * vae.config.scaling_factor
        ids = tok(caps + [""], padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        ctx_all = text(ids)[0]
    ctx, null = ctx_all[:-1], ctx_all[-1:]
    ab = sched.alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=g)
        t = torch.randint(0, len(ab), (batch_size,), generator=g)
        eps = torch.randn(batch_size, *z.shape[1:], generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z[idx] + (1 - a).sqrt() * eps
        c = torch.where((torch.rand(batch_size, generator=g) < 0.1).view(-1, 1, 1), null, ctx[idx])
        loss = (unet(x_t, t, encoder_hidden_states=c).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
