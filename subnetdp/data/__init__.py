"""Data sources. Each worker reads its own shard; the global batch is N x the per-worker batch.

    from subnetdp.data import ImageClassification, load_fashion_mnist, load_cifar
    data = ImageClassification(*load_fashion_mnist("train"), *load_fashion_mnist("test"), pad_to=32)
    x, y = data.train_batch(step, rank, world_size, batch_size=64, seed=0)

    from subnetdp.data import load_text, make_tokenizer, TokenData
    text = load_text("shakespeare")
    stream = TokenData.from_text(text, make_tokenizer("char", text)).stream(seq_len=256)
"""

from .batches import ImageClassification, SyntheticImageData, SyntheticTokenData, TokenStream
from .cifar import load_cifar, write_fake_cifar
from .download import download
from .fashion_mnist import load_fashion_mnist, read_idx
from .synthetic import SyntheticImages
from .text import BPETokenizer, ByteTokenizer, CharTokenizer, TokenData, load_text, load_tokenizer, make_tokenizer

__all__ = [
    "SyntheticImages", "download", "load_fashion_mnist", "read_idx", "load_cifar", "write_fake_cifar",
    "load_text", "CharTokenizer", "ByteTokenizer", "BPETokenizer", "make_tokenizer", "load_tokenizer",
    "TokenData", "ImageClassification", "TokenStream", "SyntheticImageData", "SyntheticTokenData",
]
