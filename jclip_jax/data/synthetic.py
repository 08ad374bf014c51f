"""Synthetic data: procedurally drawn shapes with captions that name them, paraphrase text pairs and
hard-negative triplets. The embedded default dataset of the demo run and of the tests.

A scene holds one or two objects; an object is (size, colour, shape, position), e.g. "a small red circle in
the top left". 2 sizes x 8 colours x 3 shapes x 4 positions = 192 distinct single-object captions. Every
attribute is visible at 32 px (objects span 28% or 50% of the side, one per image quadrant), so a tiny CLIP
can learn to tell all of them apart.

Splits written by `write_synthetic(DIR)`:
    DIR/train       image_text: random scenes (a fraction with two objects), canonical captions
    DIR/eval        image_text: one new rendering of each distinct single-object caption (192 by default,
                    so chance-level retrieval R@1 is 1/192 = 0.5%)
    DIR/text_pairs  text_pair: datasets "paraphrase" (caption <-> reworded caption) and "attributes"
                    (caption <-> attribute list)
    DIR/eval_text_pairs  text_pair: each distinct caption with a held-out paraphrase (text->text eval)
    DIR/triplets    triplet: caption, paraphrase, 7 paraphrases of captions that differ in one attribute
    DIR/tokenizer.json  a BERT-style uncased WordPiece tokenizer ([PAD]=0, [CLS] ... [SEP]) trained on all of
                    the above text, so the demo needs no download (jina-clip-v1's kind)
    DIR/xlmr_tokenizer.json  an XLM-R-style SentencePiece Unigram tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3;
                    <s> ... </s>) trained on the same text (jina-clip-v2's kind: the v2 recipes' runlocal)
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from jclip_jax.data import records
from jclip_jax.data.batch import NEGATIVES_PER_QUERY

COLOURS = {  # name -> RGB; saturated and far apart so they survive JPEG, resizing and jitter
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.5}  # object side as a fraction of the image side
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25),
             "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}  # object centre, fraction of side
OBJECTS = tuple(itertools.product(SIZES, COLOURS, SHAPES, POSITIONS))  # 192 (size, colour, shape, position)

_SIZE_WORDS = {"small": ("little", "tiny"), "large": ("big", "huge")}
_SHAPE_WORDS = {"circle": ("disc", "round shape"), "square": ("box", "block"),
                "triangle": ("wedge", "three-sided shape")}
_SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges


def caption(objects) -> str:
    """Canonical caption, e.g. 'a small red circle in the top left and a large blue square in the ...'."""
    return " and ".join(f"a {s} {c} {sh} in the {p}" for s, c, sh, p in objects)


def paraphrase(obj, rng: np.random.Generator) -> str:
    """Another wording of one object's caption (synonyms, different word order)."""
    size, colour, shape, position = obj
    size_word = _SIZE_WORDS[size][rng.integers(2)]
    shape_word = _SHAPE_WORDS[shape][rng.integers(2)]
    templates = (f"there is a {size_word} {colour} {shape_word} at the {position}",
                 f"{position}: one {colour} {shape_word}, {size_word}",
                 f"the picture shows a {colour} {shape_word} that is {size_word}, placed {position}")
    return templates[rng.integers(len(templates))]


def attribute_list(obj, rng: np.random.Generator) -> str:
    parts = [f"size: {obj[0]}", f"colour: {obj[1]}", f"shape: {obj[2]}", f"position: {obj[3]}"]
    return "; ".join(parts[i] for i in rng.permutation(4))


def render(objects, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draws the objects on a dark, randomly tinted background with jittered position, size and colour."""
    side = image_size * _SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    img = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(img)
    for size, colour, shape, position in objects:
        extent = SIZES[size] * side * rng.uniform(0.9, 1.05)
        cx, cy = (np.asarray(POSITIONS[position]) + rng.uniform(-0.03, 0.03, 2)) * side
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
        x0, y0, x1, y1 = cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((image_size, image_size), Image.LANCZOS)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _random_scene(rng: np.random.Generator, two_object_fraction: float) -> list[tuple]:
    first = OBJECTS[rng.integers(len(OBJECTS))]
    if rng.random() >= two_object_fraction:
        return [first]
    others = [o for o in OBJECTS if o[3] != first[3]]  # one object per quadrant: they never overlap
    second = others[rng.integers(len(others))]
    return sorted([first, second], key=lambda o: list(POSITIONS).index(o[3]))


def image_text_train(num: int, image_size: int, seed: int,
                     two_object_fraction: float = 0.25) -> Iterator[dict]:
    rng = np.random.default_rng([seed, 0])
    for i in range(num):
        scene = _random_scene(rng, two_object_fraction)
        image = _png(render(scene, image_size, rng))
        yield {"key": f"train-{i:06d}", "image": image, "captions": [caption(scene)]}


def image_text_eval(num: int, image_size: int, seed: int) -> Iterator[dict]:
    """`num` distinct single-object captions (all 192 by default), one new rendering each."""
    if not 1 <= num <= len(OBJECTS):
        raise ValueError(f"num_eval must be in [1, {len(OBJECTS)}] (distinct captions), got {num}")
    rng = np.random.default_rng([seed, 1])
    for i, j in enumerate(sorted(rng.choice(len(OBJECTS), num, replace=False))):
        obj = OBJECTS[j]
        image = _png(render([obj], image_size, rng))
        yield {"key": f"eval-{i:04d}", "image": image, "captions": [caption([obj])]}


def text_pairs(num_per_dataset: int, seed: int) -> Iterator[dict]:
    rng = np.random.default_rng([seed, 2])
    for _ in range(num_per_dataset):
        obj = OBJECTS[rng.integers(len(OBJECTS))]
        yield {"query": caption([obj]), "positive": paraphrase(obj, rng), "dataset": "paraphrase"}
        obj = OBJECTS[rng.integers(len(OBJECTS))]
        yield {"query": caption([obj]), "positive": attribute_list(obj, rng), "dataset": "attributes"}


def text_pairs_eval(seed: int) -> Iterator[dict]:
    """Held-out text pairs: each distinct caption with a new paraphrase (chance R@1 = 1/192)."""
    rng = np.random.default_rng([seed, 5])
    for obj in OBJECTS:
        yield {"query": caption([obj]), "positive": paraphrase(obj, rng), "dataset": "paraphrase"}


def triplets(num: int, seed: int) -> Iterator[dict]:
    """Hard negatives: paraphrases of the objects that differ from the query's in exactly one attribute."""
    rng = np.random.default_rng([seed, 3])
    for _ in range(num):
        obj = OBJECTS[rng.integers(len(OBJECTS))]
        neighbours = [o for o in OBJECTS if sum(a != b for a, b in zip(o, obj, strict=True)) == 1]
        picked = rng.choice(len(neighbours), NEGATIVES_PER_QUERY, replace=False)
        yield {"query": caption([obj]), "positive": paraphrase(obj, rng),
               "negatives": [paraphrase(neighbours[k], rng) for k in picked], "dataset": "synthetic"}


def vocabulary_texts(seed: int = 0) -> list[str]:
    """Every word the synthetic data uses, in captions, paraphrases and attribute lists."""
    rng = np.random.default_rng([seed, 4])
    texts = [caption([o]) for o in OBJECTS]
    texts += [paraphrase(o, rng) for o in OBJECTS for _ in range(6)]
    texts += [attribute_list(o, rng) for o in OBJECTS]
    return texts


def write_tokenizer(path: str | os.PathLike, texts: list[str], vocab_size: int = 256) -> None:
    """Trains a BERT-style uncased WordPiece tokenizer.json on `texts`.
    Special tokens: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; encodings are [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    tokenizer.save(os.fspath(path))


def write_xlmr_style_tokenizer(path: str | os.PathLike, texts: list[str], vocab_size: int = 256) -> None:
    """Trains an XLM-R-shaped tokenizer.json on `texts`, like jina-embeddings-v3's but tiny: SentencePiece
    Unigram with NFKC and Metaspace; <s>=0, <pad>=1, </s>=2, <unk>=3; encodings are <s> ... </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.save(os.fspath(path))


TOKENIZERS = {"tokenizer.json": write_tokenizer, "xlmr_tokenizer.json": write_xlmr_style_tokenizer}


def write_tokenizers(output_dir: str | os.PathLike, seed: int = 0) -> None:
    """The tokenizers of TOKENIZERS that `output_dir` lacks (a directory written before one was added)."""
    for name, write in TOKENIZERS.items():
        path = os.path.join(os.fspath(output_dir), name)
        if not os.path.exists(path):
            write(path, vocabulary_texts(seed))


def write_synthetic(output_dir: str | os.PathLike, num_train: int = 5000, num_eval: int = len(OBJECTS),
                    num_text_pairs: int = 5000, num_triplets: int = 2000, image_size: int = 64,
                    seed: int = 0, progress=None) -> dict[str, dict]:
    """Writes the four splits (module docstring) as prepared directories; returns {split: summary}.
    `progress(iterable, total, desc)` wraps the record streams (e.g. tqdm)."""
    progress = progress or (lambda it, total, desc: it)
    splits = {
        "train": ("image_text", image_text_train(num_train, image_size, seed), num_train),
        "eval": ("image_text", image_text_eval(num_eval, image_size, seed), num_eval),
        "text_pairs": ("text_pair", text_pairs(num_text_pairs, seed), 2 * num_text_pairs),
        "eval_text_pairs": ("text_pair", text_pairs_eval(seed), len(OBJECTS)),
        "triplets": ("triplet", triplets(num_triplets, seed), num_triplets),
    }
    summaries = {}
    for split, (kind, stream, total) in splits.items():
        with records.RecordWriter(os.path.join(os.fspath(output_dir), split), kind) as writer:
            for record in progress(stream, total, split):
                writer.write(record, dataset="synthetic")
        summaries[split] = writer.close()
    write_tokenizers(output_dir, seed)
    return summaries
