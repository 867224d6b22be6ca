"""CLIP's BPE vocabulary, the tokenizer of Stable Diffusion 1.x and 2.x, read offline from the merges file that
open_clip ships: the tiny backend builds its tokenizer from it, and the identifier check asks it how common a word is.

A BPE learns its merges from the most frequent pair first, so the merge that completes a whole word ('dog</w>')
ranks the word by how often CLIP's training text used it: 'the' is merge 7, 'dog' 1,418 and 'sks' 47,625 of 48,894.
An identifier the model already knows well (a common word, or the class noun) cannot be rebound to the subject
without dragging its meaning along ('a dog dog'), which is why DreamBooth asks for a rare token.

Nothing here imports open_clip (it would load torch and timm): its package folder is located, not executed.

What this module does not hold: the tokenizer object (tiny.py builds it) or where the check is made (the backends).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 bytes ending a word, the merges, 2 special tokens
COMMON_WORD_RANK = 20_000  # whole words completed by the first 20,000 merges are common words
RARE_EXAMPLES = ("sks", "ohwx")  # single CLIP tokens from the last merges: the usual DreamBooth identifiers


def merges_file() -> Path:
    """open_clip's bundled BPE merges (the file open_clip.tokenizer.default_bpe() names)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; `pip install -r requirements.txt` installs it.")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def clip_merges() -> tuple[str, ...]:
    """CLIP's merges in rank order, as "a b" lines (the file's header line and its unused tail left out)."""
    with gzip.open(merges_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    return tuple(lines[1 : MERGES + 1])


@functools.lru_cache(maxsize=1)
def _whole_word_ranks() -> dict[str, int]:
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(clip_merges(), 1):
        token = merge.replace(" ", "")
        if token.endswith("</w>"):
            ranks.setdefault(token[: -len("</w>")], rank)
    return ranks


def whole_word_rank(word: str) -> int | None:
    """The merge that makes `word` one token of CLIP's vocabulary (lower-cased, as CLIP reads it): 0 for a single
    character (part of the base vocabulary, the most common of all), None when the word takes several tokens."""
    word = word.lower()
    if len(word) == 1:
        return 0
    return _whole_word_ranks().get(word)


def common_word_problem(identifier: str) -> str | None:
    """Why `identifier` is a word CLIP's tokenizer knows well, or None when it is rare enough to bind a subject."""
    rank = whole_word_rank(identifier)
    if rank is None or rank > COMMON_WORD_RANK:
        return None
    where = "a single character" if rank == 0 else f"whole word no. {rank:,} of CLIP's {MERGES:,} BPE merges"
    return (f"{identifier!r} is a common word for the model's tokenizer ({where}; the first {COMMON_WORD_RANK:,} "
            "are common words), so the model already means something by it and training would pull that meaning "
            f"into the subject. Use a rare token, e.g. {' or '.join(repr(w) for w in RARE_EXAMPLES)}.")
