"""Work-around for the session tiny BERT: under transformers 5 its tokenizer loses the WordPiece vocab.

``BertTokenizerFast(vocab_file=...)`` is ignored by transformers 5 (the argument is now ``vocab``), so the
fixture's tokenizer maps every word to ``[UNK]`` and all texts of one length embed identically. Tests whose
assertions depend on text content use :func:`with_vocab`, which is a no-op once the fixture is fixed.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def with_vocab(tiny_bert_path: Path, out_dir: Path) -> Path:
    """``tiny_bert_path`` itself if its tokenizer knows the vocab, else a copy with the vocab restored."""
    from transformers import AutoTokenizer, BertTokenizerFast

    vocab_file = Path(tiny_bert_path).parent / "vocab.txt"
    if len(AutoTokenizer.from_pretrained(str(tiny_bert_path))) > 5 or not vocab_file.exists():
        return Path(tiny_bert_path)
    target = Path(out_dir) / "tiny-bert-with-vocab"
    shutil.copytree(tiny_bert_path, target)
    words = vocab_file.read_text(encoding="utf-8").split()
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(str(target))
    return target
