"""Test fixtures that make their own data: a WordPiece tokenizer trained in-process, tiny images."""

import importlib.util
import os

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
    """get_config(arg) of configs/<name>.py (e.g. 'demo'; 'jina_clip_v2', 'stage=2'), as jclip-train loads it."""
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), os.path.join(REPO, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


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


def write_xlmr_style_tokenizer(path: str, texts=None, vocab_size: int = 200) -> str:
    """An XLM-R-shaped tokenizer.json (SentencePiece Unigram; <s>=0, <pad>=1, </s>=2, <unk>=3; <s> ... </s>)
    trained in-process on `texts` (default CORPUS), like jina-embeddings-v3's but tiny (data/synthetic.py's)."""
    from jclip_jax.data.synthetic import write_xlmr_style_tokenizer as write

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write(path, list(texts or CORPUS), vocab_size)
    return path
