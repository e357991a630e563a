"""Tiny tokenizers built in-test (nothing downloads): a SentencePiece model and a tokenizer.json."""

from __future__ import annotations

import os

LINES = ["the cat sat on the mat", "a dog ate my homework", "one two three four five",
         "what is two plus three", "the answer is five"] * 20


def build_hf_tokenizer(directory: str, *, vocab_size: int = 60) -> str:
  """Trains a BPE tokenizer.json with special tokens <unk> (0), <s> (1), </s> (2); its path."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  tokenizer.train_from_iterator(LINES, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
  path = os.path.join(directory, "tokenizer.json")
  tokenizer.save(path)
  return path


def build_spm(directory: str, *, t5_ids: bool = True, name: str = "spm") -> str:
  """Trains a 30-piece SentencePiece unigram model (T5 ids: pad 0, eos 1, unk 2); its path."""
  import sentencepiece as spm
  text = os.path.join(directory, "spm_text.txt")
  with open(text, "w", encoding="utf-8") as f:
    f.write("\n".join(LINES))
  ids = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1) if t5_ids else {}
  spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(directory, name),
                                 vocab_size=30, minloglevel=2, **ids)
  return os.path.join(directory, f"{name}.model")
