"""Vocabularies from a spec string: "byte", "spm:/path/model", "hf:/path/tokenizer.json".

Every vocabulary here is a ``seqio.Vocabulary``, so tasks, Grow, evaluation and the sampler use
them alike. rest_jax's models (rest_jax/models/base.py) fix two ids: 0 is padding and 1 ends a
sequence (EOS). Vocabularies must follow that:

* "byte": seqio.ByteVocabulary (0 pad, 1 eos, 2 unk, byte b -> b + 3).
* "spm:PATH": seqio.SentencePieceVocabulary over a SentencePiece model that already uses the T5
  convention (pad 0, eos 1; e.g. the T5 / mT5 vocabularies). Other models are refused with the
  trainer flags that make a conforming one.
* "hf:PATH[?pad=TOKEN&eos=TOKEN]": a Hugging Face ``tokenizer.json`` (``tokenizers`` package).
  Its pad and eos tokens are found in ``tokenizer_config.json`` next to it, else among common
  names ("<pad>", "</s>", "<|endoftext|>", ...), or declared in the query (percent-encode "&",
  "=" and "%" inside a token). The vocabulary then uses a fixed permutation of the tokenizer's
  ids: the pad token becomes id 0, the eos token id 1, and the two tokens that held ids 0 and 1
  move to the pad / eos token's old ids; every other id is unchanged. ``model_to_hf`` (int64
  `[vocab_size]`, model id -> tokenizer id) is that permutation: to use a pretrained embedding
  table ``E_hf [vocab, d]`` (and LM head) with this vocabulary, take ``E_hf[model_to_hf]``.
  A tokenizer without a pad token (Llama: declare ``pad=<unk>``) or whose pad is its eos is
  refused with that fix.
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from typing import Sequence

import numpy as np
import seqio
import tensorflow as tf

from rest_jax import storage
from rest_jax.errors import RestJaxError
from rest_jax.models.base import EOS_ID, PAD_ID

_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")
_UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")
_SPEC_HELP = ('use "byte", "spm:/path/to/spm.model" or "hf:/path/to/tokenizer.json" '
              '(optionally "hf:/path/tokenizer.json?pad=<unk>&eos=</s>").')


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face ``tokenizers`` tokenizer as a seqio Vocabulary (pad 0, eos 1).

  Encoding never adds special tokens (seqio adds EOS itself); put a BOS into the text (e.g. a
  prompt template starting with "<s>") where a pretrained model expects one: added tokens that
  appear in the text are encoded as their ids.
  """

  def __init__(self, path: str, *, pad_token: str = "", eos_token: str = ""):
    """Loads ``path`` (a tokenizer.json) and fixes the pad / eos tokens (see module docstring).

    Raises:
      RestJaxError: the file is missing or unreadable, or no usable pad / eos token was found.
    """
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise RestJaxError("hf: vocabularies need the `tokenizers` package: "
                         "pip install tokenizers") from None
    if not storage.exists(path) or storage.isdir(path):
      raise RestJaxError(f"tokenizer file {path} does not exist; point the hf: vocabulary to a "
                         "Hugging Face tokenizer.json.")
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(storage.read_text(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses.
      raise RestJaxError(f"cannot read tokenizer {path}: {str(e)[:200]}; it must be a Hugging "
                         "Face tokenizer.json (tokenizers.Tokenizer.save).") from None
    self.path = path
    declared = _tokenizer_config(path)
    hf_pad = self._find(pad_token or declared.get("pad_token", ""), _PAD_NAMES, "pad")
    hf_eos = self._find(eos_token or declared.get("eos_token", ""), _EOS_NAMES, "eos")
    if hf_pad == hf_eos:
      raise RestJaxError(
          f"tokenizer {path}: the pad token and the eos token are the same id ({hf_eos}), but "
          "rest_jax needs distinct ids for them; declare a pad token that never occurs in "
          "text, e.g. vocabulary = 'hf:PATH?pad=<unk>'.")
    size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    model_to_hf = np.arange(size, dtype=np.int64)
    for model_id, hf_id in ((PAD_ID, hf_pad), (EOS_ID, hf_eos)):
      where = int(np.flatnonzero(model_to_hf == hf_id)[0])
      model_to_hf[[model_id, where]] = model_to_hf[[where, model_id]]
    self.model_to_hf = model_to_hf
    self.hf_to_model = np.argsort(model_to_hf)
    self.hf_pad_id, self.hf_eos_id = hf_pad, hf_eos
    hf_unk = next((i for i in map(self._tokenizer.token_to_id, _UNK_NAMES) if i is not None),
                  None)
    self._unk = None if hf_unk is None or hf_unk == hf_pad else int(self.hf_to_model[hf_unk])
    super().__init__(extra_ids=0)

  def _find(self, declared: str, names: Sequence[str], what: str) -> int:
    if declared:
      token_id = self._tokenizer.token_to_id(declared)
      if token_id is None:
        raise RestJaxError(f"tokenizer {self.path} has no token {declared!r} (declared as its "
                           f"{what} token); use one of its tokens, e.g. "
                           f"vocabulary = 'hf:PATH?{what}=</s>'.")
      return int(token_id)
    for name in names:
      token_id = self._tokenizer.token_to_id(name)
      if token_id is not None:
        return int(token_id)
    raise RestJaxError(
        f"tokenizer {self.path} has no {what} token among {list(names)} and none is declared "
        f"in a tokenizer_config.json next to it; declare one that never occurs in text, e.g. "
        f"vocabulary = 'hf:PATH?{what}=TOKEN' (Llama tokenizers: pad=<unk>).")

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def _base_vocab_size(self) -> int:
    return len(self.model_to_hf)

  def _encode(self, s: str) -> list[int]:
    ids = self._tokenizer.encode(s, add_special_tokens=False).ids
    return [int(i) for i in self.hf_to_model[np.asarray(ids, dtype=np.int64)]]

  def _decode(self, ids: Sequence[int]) -> str:
    size = len(self.model_to_hf)
    kept = [int(i) for i in ids if int(i) not in (PAD_ID, EOS_ID) and 0 <= int(i) < size]
    return self._tokenizer.decode([int(self.model_to_hf[i]) for i in kept],
                                  skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> int32 `[n]`; string `[batch]` -> int32 ragged `[batch, None]`."""

    def encode(strings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      rows = [self._encode(v.decode("utf-8")) for v in np.asarray(strings).reshape(-1)]
      values = np.asarray([i for row in rows for i in row], dtype=np.int32)
      return values, np.asarray([len(row) for row in rows], dtype=np.int64)

    values, lengths = tf.numpy_function(encode, [s], [tf.int32, tf.int64], stateful=False)
    values.set_shape([None])
    if s.shape.rank == 0:
      return values
    return tf.RaggedTensor.from_row_lengths(values, lengths)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int `[n]` -> scalar string; int `[batch, n]` -> string `[batch]`."""

    def decode(array: np.ndarray) -> np.ndarray:
      rows = np.asarray(array).reshape(-1, array.shape[-1]) if array.ndim else array[None, None]
      out = np.asarray([self._decode(row.tolist()).encode("utf-8") for row in rows],
                       dtype=object)
      return out.reshape(array.shape[:-1])

    out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, HFTokenizerVocabulary) and self.path == other.path
            and (self.hf_pad_id, self.hf_eos_id) == (other.hf_pad_id, other.hf_eos_id))

  def __hash__(self) -> int:
    return hash((self.path, self.hf_pad_id, self.hf_eos_id))


def _tokenizer_config(path: str) -> dict[str, str]:
  """pad_token / eos_token of a tokenizer_config.json next to ``path`` (missing -> {})."""
  config_path = storage.join(storage.dirname(path), "tokenizer_config.json")
  if not storage.exists(config_path):
    return {}
  try:
    with storage.open_read(config_path, "r") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise RestJaxError(f"cannot read {config_path}: {e}; fix or remove it (it is only read "
                       "for its pad_token / eos_token).") from None
  out = {}
  for key in ("pad_token", "eos_token"):
    value = raw.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str) and value:
      out[key] = value
  return out


def _check_spm(path: str, vocab: seqio.SentencePieceVocabulary) -> None:
  if not storage.exists(path) or storage.isdir(path):
    raise RestJaxError(f"SentencePiece model {path} does not exist; point the spm: vocabulary "
                       "to a .model file.")
  try:
    processor = vocab.tokenizer
  except Exception as e:  # sentencepiece raises RuntimeError / OSError on bad files.
    raise RestJaxError(f"cannot read SentencePiece model {path}: {str(e)[:200]}.") from None
  if processor.pad_id() != PAD_ID or processor.eos_id() != EOS_ID:
    raise RestJaxError(
        f"SentencePiece model {path} has pad id {processor.pad_id()} and eos id "
        f"{processor.eos_id()}, but rest_jax needs pad {PAD_ID} and eos {EOS_ID} (the T5 "
        "convention); train it with --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1, or use a "
        "tokenizer.json through an hf: vocabulary (which remaps the ids).")


@functools.lru_cache(maxsize=None)
def get_vocabulary(spec: str) -> seqio.Vocabulary:
  """The vocabulary named by ``spec`` (see the module docstring); cached per spec.

  Raises:
    RestJaxError: unknown spec kind, missing or unreadable file, ids that break the pad 0 /
      eos 1 convention.
  """
  if spec == "byte":
    return seqio.ByteVocabulary()
  kind, _, rest = spec.partition(":")
  if kind == "spm" and rest:
    vocab = seqio.SentencePieceVocabulary(rest)
    _check_spm(rest, vocab)
    return vocab
  if kind == "hf" and rest:
    path, _, query = rest.partition("?")
    options = {}
    for item in filter(None, query.split("&")):
      key, sep, value = item.partition("=")
      if not sep or key not in ("pad", "eos"):
        raise RestJaxError(f"vocabulary {spec!r}: bad option {item!r}; only pad=TOKEN and "
                           "eos=TOKEN are understood.")
      options[f"{key}_token"] = urllib.parse.unquote(value)
    return HFTokenizerVocabulary(path, **options)
  raise RestJaxError(f"vocabulary {spec!r} is not understood; {_SPEC_HELP}")
