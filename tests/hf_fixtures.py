"""Builders of tiny Hugging Face model folders for tests (no network, a few ms each).

Each builder trains a tokenizer with ``tokenizers`` on `CORPUS` (WordPiece for BERT, byte-level
BPE for GPT2/RoBERTa, Unigram for T5), saves it with ``save_pretrained`` next to a randomly
initialised tiny network, and returns the folder: ``config.json`` + ``model.safetensors`` +
``tokenizer.json`` / ``tokenizer_config.json``, the layout the real checkpoints use.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "a dog barks",
    "a dog is barking loudly",
    "a car passes by on a wet road",
    "rain falls on a roof",
    "birds sing in the morning",
    "an engine idles then stops",
    "a siren wails twice in the distance",
    "people talk while dishes clatter",
    "a bell rings three times",
    "wind blows through the trees",
]
WIDTH = 32


def _fast(tok: Any, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def wordpiece_tokenizer(vocab_size: int = 200) -> Any:
    """A BERT-style uncased WordPiece tokenizer with ``[CLS] $A [SEP]`` post-processing."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # `WordPieceTrainer` picks among equally frequent merges in a run-dependent (hash map) order, so
    # its vocabulary and ids changed from build to build and tests that train on token ids were not
    # reproducible. The vocabulary is built explicitly instead: every character of `CORPUS` and every
    # lower-case letter and digit (also as ``##`` continuations), and every whole word of `CORPUS`,
    # sorted; other words split into characters.
    words = sorted({w for text in CORPUS
                    for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))})
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits))
    vocab = [*specials, *chars, *(f"##{c}" for c in chars), *(w for w in words if w not in chars)][:vocab_size]
    tok.model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return _fast(tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def bytelevel_bpe_tokenizer(specials: list[str], vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer (GPT2/RoBERTa style); ``specials`` get ids 0, 1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def unigram_tokenizer(vocab_size: int = 120) -> Any:
    """A T5-style Unigram tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``$A </s>`` post-processing."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return _fast(tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def roberta_tokenizer() -> Any:
    """RoBERTa-style tokenizer: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` 4."""
    from tokenizers import processors

    tok = bytelevel_bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return _fast(
        tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def make_gpt2_folder(folder: Path, seed: int = 0, n_positions: int = 64, n_embd: int = WIDTH, n_layer: int = 2,
                     n_head: int = 2) -> Path:
    """Tiny GPT2 (2 layers, width 32, ``n_positions`` positions unless given; GPT2's own: 1024,
    768, 12, 12) saved as ``GPT2LMHeadModel``; tokenizer without pad token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _fast(bytelevel_bpe_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head, bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_bert_folder(folder: Path, family: str = "bert", seed: int = 0) -> Path:
    """Tiny BERT (WordPiece) or RoBERTa (byte-level BPE) encoder with a pooler, 2 layers, width 32."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    sizes = {"hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    torch.manual_seed(seed)
    if family == "bert":
        tok = wordpiece_tokenizer()
        model = BertModel(BertConfig(vocab_size=len(tok), max_position_embeddings=64, **sizes))
    elif family == "roberta":
        tok = roberta_tokenizer()
        config = RobertaConfig(
            vocab_size=len(tok), max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, **sizes
        )
        model = RobertaModel(config)
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_t5_folder(folder: Path, seed: int = 0, d_model: int = WIDTH, num_layers: int = 2) -> Path:
    """Tiny T5 (gated-GELU like Flan-T5; 2 layers, width 32 unless given) saved as
    ``T5ForConditionalGeneration``. ``d_model`` is the width of its embeddings: give a real model's
    (Flan-T5-large: 1024) where a config declares it; depth and the MLP stay tiny."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = unigram_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=num_layers,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_clap_folder(folder: Path, seed: int = 0) -> Path:
    """Tiny LAION-layout ``ClapModel`` (RoBERTa text tower, HTSAT audio tower) with a RoBERTa tokenizer."""
    from transformers import ClapConfig, ClapModel

    tok = roberta_tokenizer()
    text = {
        "vocab_size": len(tok),
        "hidden_size": WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 66,
        "projection_dim": 16,
    }
    audio = {
        "hidden_size": 32,
        "patch_embeds_hidden_size": 8,
        "depths": [1, 1],
        "num_attention_heads": [1, 2],
        "num_hidden_layers": 2,
        "spec_size": 32,
        "num_mel_bins": 16,
        "window_size": 4,
        "projection_dim": 16,
        "patch_size": 4,
        "patch_stride": [4, 4],
    }
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16))
    with torch.no_grad():  # non-zero biases, so a missed bias would show
        for p in model.text_projection.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def clip_bpe_tokenizer(vocab_size: int = 400) -> Any:
    """A CLIP tokenizer (transformers ``CLIPTokenizer``: lower-cased byte-level BPE with ``</w>``
    word ends, ``<|startoftext|>`` 0 and ``<|endoftext|>`` 1 around every text, padded with
    ``<|endoftext|>``), its BPE trained on `CORPUS` plus every lower-case letter, digit and common
    punctuation mark as a word of its own, so ordinary captions never hit the unknown token."""
    import json
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    layout = CLIPTokenizer().backend_tokenizer  # CLIP's own normaliser and pre-tokeniser
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer, tok.pre_tokenizer = layout.normalizer, layout.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator([*CORPUS, " ".join(string.ascii_lowercase + string.digits + "!,.?'-")], trainer)
    merges = [tuple(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=tok.get_vocab(), merges=merges)


def make_clip_text_folder(folder: Path, seed: int = 0, full: bool = False) -> Path:
    """Tiny CLIP text tower (2 layers, width 32, 32 positions, projection 16) with a CLIP tokenizer,
    saved as ``CLIPTextModelWithProjection`` (``model_type: clip_text_model``), or with ``full``
    as a whole ``CLIPModel`` (``model_type: clip``, a tiny vision tower beside it: the published
    layout)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection

    tok = clip_bpe_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    if full:
        vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 8, "patch_size": 4, "projection_dim": 16}  # fmt: skip
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=16))
    else:
        model = CLIPTextModelWithProjection(text)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
