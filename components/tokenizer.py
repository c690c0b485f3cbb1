"""A small CLIP-format BPE tokenizer, built offline from a shipped word list.

No CLIP BPE vocabulary ships with transformers, so the tiny preset trains its own: the
same normalizer and pre-tokenizer as CLIP's (lower-case, ``</w>`` end-of-word suffix,
byte-level alphabet), trained with the ``tokenizers`` BPE trainer on
``tokenizer_words.txt``. The result is a plain :class:`transformers.CLIPTokenizer`
(``vocab.json`` + ``merges.txt``), so every loader that reads a real CLIP tokenizer
reads this one, and ``add_tokens`` / textual inversion work unchanged.

Every word of the word list becomes one token; any other text still tokenizes (it falls
back to shorter pieces down to single bytes).
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

WORDS_FILE = Path(__file__).with_name("tokenizer_words.txt")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def read_words(path: Path = WORDS_FILE) -> list[str]:
    """Words of the list, one or more per line; ``#`` starts a comment."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip().lower()
        words.extend(line.split())
    return sorted(set(words))


def build_tiny_tokenizer(words: list[str] | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """Learn CLIP-format BPE merges under which each given word is a single token.

    Classic BPE training on the word list (every word counted once): repeatedly merge
    the most frequent adjacent pair, ties broken by the pair itself, so the same word
    list always gives the same vocabulary and merges.
    """
    words = read_words() if words is None else sorted(set(w.lower() for w in words))
    byte_map = _bytes_to_unicode()
    alphabet = sorted(byte_map.values())
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for piece in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab[piece] = len(vocab)
    # each word as a list of symbols, the last one carrying the end-of-word suffix
    seqs = []
    for w in words:
        chars = [byte_map[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        vocab.setdefault(merged, len(vocab))
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def build_tiny_t5_tokenizer(words: list[str] | None = None, model_max_length: int = 120):
    """A T5-format (SentencePiece Unigram) tokenizer over the same word list, for the
    tiny PixArt-α preset: every listed word is one piece (``▁word``); other text falls
    back to single characters. A plain :class:`transformers.T5Tokenizer`, saved and
    loaded like PixArt-α's own (no BOS token; ``</s>`` ends every prompt)."""
    from transformers import T5Tokenizer

    words = read_words() if words is None else sorted(set(w.lower() for w in words))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words]
    chars = sorted({chr(c) for c in range(33, 127)})
    vocab += [(ch, -8.0) for ch in chars] + [("▁" + ch, -7.0) for ch in chars if "▁" + ch not in dict(vocab)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
