"""Training data for the default model: shapes-world images as numpy arrays, and a word-level
CLIP tokenizer over the world's vocabulary.

No JAX here: the pool workers that draw images import only this module and the world.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np

from tools import shapes_world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for byte values, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_vocabulary() -> list[str]:
    """Every word of every shapes-world caption, sorted."""
    return sorted({w for caption in shapes_world.all_captions("all") for w in caption.split()})


def build_word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) under which each of `words` is exactly one token.

    Each word is built left to right; where an earlier word's merge splits a later word
    differently, merges joining the pieces actually produced are appended, until every
    word comes out whole. Every byte symbol (alone and word-final) is in the vocabulary
    too, so any other text still tokenizes without an unknown token.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        built = parts[0]
        for p in parts[1:]:
            merges.append((built, p))
            built += p
    for _ in range(10):
        ranks = {m: i for i, m in enumerate(dict.fromkeys(merges))}
        broken = [(w, _bpe(w, ranks)) for w in words if len(_bpe(w, ranks)) > 1]
        if not broken:
            break
        for _, pieces in broken:
            built = pieces[0]
            for p in pieces[1:]:
                merges.append((built, p))
                built += p
    else:
        raise RuntimeError("could not build a word-level BPE for the world's vocabulary")
    merges = list(dict.fromkeys(merges))
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(folder: str, max_length: int = 77) -> int:
    """Writes a CLIP tokenizer folder (vocab.json, merges.txt, configs); returns the vocab size."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab, merges = build_word_bpe(word_vocabulary())
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                              pad_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(folder)
    return len(vocab)


# --- images -------------------------------------------------------------------------------

def _draw_range(args):
    seed, start, stop, keep_256_below = args
    captions, small, large = [], [], []
    for index in range(start, stop):
        ex = shapes_world.example(seed, index, "train")
        captions.append(ex.caption)
        small.append(ex.image64)
        if index < keep_256_below:
            large.append(ex.image256)
    large_array = np.stack(large) if large else np.zeros((0, 256, 256, 3), np.uint8)
    return captions, np.stack(small), large_array


def generate(seed: int, count: int, count_256: int, workers: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`count` training examples: captions, 64x64 images (count, 64, 64, 3) uint8, and the
    256x256 images of the first `count_256` (count_256, 256, 256, 3) uint8.

    Drawn by a pool of `workers` processes; example i is the same whatever the pool size.
    Only the "train" split is drawn: held-out colour-shape pairs never appear.
    """
    if count_256 > count:
        raise ValueError(f"count_256={count_256} is more than count={count}")
    chunk = max(16, min(512, count // max(1, workers * 4)))
    jobs = [(seed, s, min(s + chunk, count), count_256) for s in range(0, count, chunk)]
    if workers <= 1:
        results = [_draw_range(j) for j in jobs]
    else:
        # spawn: the parent may already run JAX threads, which fork would copy broken.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_draw_range, jobs)
    captions = [c for r in results for c in r[0]]
    return captions, np.concatenate([r[1] for r in results]), np.concatenate([r[2] for r in results])
