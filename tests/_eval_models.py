"""Tiny randomly initialised transformers models for the evaluation tests, saved locally with
``save_pretrained`` (safetensors) so the metrics load them through exactly the path real weights take.
Tokenizers are written by hand (a character-level CLIP BPE vocabulary, a small BERT WordPiece
vocabulary); nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the published definition)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer_files(folder: Path, merges: tuple[str, ...] = ("t h", "a t</w>", "o f</w>")) -> int:
    """vocab.json + merges.txt of a character-level CLIP BPE tokenizer; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    for m in merges:
        a, b = m.split()
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(tokens)


def clip_tokenizer(folder: Path, model_max_length: int = 16):
    from transformers import CLIPTokenizer

    clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, pad_token="<|endoftext|>")


def _clip_towers(tok, image_size: int) -> dict:
    """text_config / vision_config of a one-layer, 32-wide CLIP-style pair of towers (OWLv2, CLIP)."""
    return {"text_config": dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=image_size, patch_size=16)}


def tiny_dinov2(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                       patch_size=14, image_size=224)
    Dinov2Model(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_owlv2(folder: Path, seed: int = 0) -> Path:
    """OWLv2 (random) + its processor (Owlv2ImageProcessor at 64 px + a hand-written CLIP tokenizer)."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok = clip_tokenizer(folder / "tok")
    torch.manual_seed(seed)
    cfg = Owlv2Config(**_clip_towers(tok, image_size=64), projection_dim=32)
    Owlv2ForObjectDetection(cfg).save_pretrained(folder, safe_serialization=True)
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    proc.save_pretrained(folder)
    return folder


def tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """transformers CLIPModel (random, PickScore's architecture) + CLIPProcessor at 32 px."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = clip_tokenizer(folder / "tok")
    torch.manual_seed(seed)
    cfg = CLIPConfig(**_clip_towers(tok, image_size=32), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "circle", "square",
              "cat", "dog", "and", "the", "is", "there", "##s", "two", "three", "green", "star", "triangle"]


def bert_tokenizer_folder(folder: Path) -> Path:
    """A BERT WordPiece tokenizer folder (vocab.txt) with BLIP's two added tokens ([DEC], [ENC])."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    tok = BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(folder)
    return folder


VQA_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "yes", "no", "is", "there", "a", "cat", "dog", "red", "blue",
             "?", ".", ":", "answer", "or", "user", "assistant", "the", "left", "of"]
VQA_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                     "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
                     "{% if add_generation_prompt %}assistant : {% endif %}")


def tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A LLaVA (CLIP vision tower + Llama) with random weights, a word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VQA_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=16),
        text_config=dict(model_type="llama", vocab_size=len(VQA_WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=VQA_WORDS.index("<image>"), vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder, safe_serialization=True)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                   chat_template=VQA_CHAT_TEMPLATE, num_additional_image_tokens=1).save_pretrained(folder)
    return folder
