"""Test fixtures that make their own data: a WordPiece tokenizer trained in-process, tiny images."""

import os

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "a red circle on the left", "a blue square in the middle", "two green triangles at the top",
    "a small yellow star", "the quick brown fox jumps over the lazy dog", "a photo of a cat",
    "a photo of a dog", "machine learning on accelerators", "contrastive language image pretraining",
] * 20


def write_wordpiece_tokenizer(path: str, vocab_size: int = 200) -> str:
    """A BERT-style uncased WordPiece tokenizer.json ([PAD]=0, [CLS] ... [SEP]) trained on CORPUS."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tok.save(path)
    return path


def random_image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
