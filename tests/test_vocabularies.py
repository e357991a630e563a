"""Vocabulary specs: byte, SentencePiece (seqio's) and HF tokenizer.json with pad 0 / eos 1."""

import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from rest_jax.tasks import vocabularies
from rest_jax.errors import RestJaxError
from rest_jax.tasks.data import detokenize
from tokenizer_fixtures import build_hf_tokenizer, build_spm


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  return build_hf_tokenizer(str(tmp_path_factory.mktemp("hf")))


def test_byte_spec():
  vocab = vocabularies.get_vocabulary("byte")
  assert isinstance(vocab, seqio.ByteVocabulary)
  assert vocab.encode("ab") == [100, 101]


def test_hf_vocabulary_remaps_pad_and_eos(hf_path):
  from tokenizers import Tokenizer
  raw = Tokenizer.from_file(hf_path)
  assert [raw.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
  # Llama-like: no pad token, so declare <unk>; eos "</s>" is found by name.
  with pytest.raises(RestJaxError, match="no pad token"):
    vocabularies.HFTokenizerVocabulary(hf_path)
  vocab = vocabularies.get_vocabulary(f"hf:{hf_path}?pad=<unk>")
  # <unk> (tokenizer id 0) stays model id 0; </s> (2) becomes 1; <s> (1) moves to 2.
  assert vocab.model_to_hf[:4].tolist() == [0, 2, 1, 3]
  assert vocab.eos_id == 1 and vocab.pad_id == 0 and vocab.vocab_size == raw.get_vocab_size()
  text = "the cat ate my homework"
  hf_ids = raw.encode(text, add_special_tokens=False).ids
  ids = vocab.encode(text)
  assert ids == [int(vocab.hf_to_model[i]) for i in hf_ids]  # ids >= 3 are unchanged.
  assert ids == hf_ids
  assert vocab.decode(ids) == text
  assert vocab.decode(ids + [1, 7, 8]) == text  # Stops at EOS.
  # "</s>" written in the text encodes as EOS (model id 1), "<s>" as model id 2.
  assert vocab.encode("<s>the") == [2] + vocab.encode("the")
  # The TF path (seqio tokenize preprocessor, decode_tf) agrees with the Python path.
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  ragged = vocab.encode_tf(tf.constant([text, "a dog"]))
  assert ragged.to_list() == [ids, vocab.encode("a dog")]
  padded = tf.constant([ids + [1, 9], ids + [0, 0]], dtype=tf.int32)
  assert vocab.decode_tf(padded).numpy().tolist() == [text.encode()] * 2
  # tasks.data.detokenize drops EOS and padding.
  tokens = np.asarray([ids + [1, 0, 0]])
  assert detokenize(vocab, tokens, np.asarray([len(ids) + 1])) == [text]


def test_hf_ids_from_tokenizer_config_and_query(tmp_path, hf_path):
  directory = tmp_path / "model"
  directory.mkdir()
  path = str(directory / "tokenizer.json")
  with open(hf_path) as src, open(path, "w") as dst:
    dst.write(src.read())
  # GPT-2 style: pad and eos are the same token -> refused with the fix.
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "</s>", "pad_token": {"content": "</s>"}}))
  with pytest.raises(RestJaxError, match="pad token and the eos token are the same"):
    vocabularies.HFTokenizerVocabulary(path)
  # The query overrides the config: pad <s> (id 1) -> 0 and eos </s> (id 2) -> 1.
  vocab = vocabularies.get_vocabulary(f"hf:{path}?pad=%3Cs%3E")
  assert vocab.model_to_hf[:3].tolist() == [1, 2, 0]
  assert vocab.hf_to_model[vocab.model_to_hf].tolist() == list(range(vocab.vocab_size))
  assert vocab.unk_id == 2  # <unk> moved to model id 2.
  with pytest.raises(RestJaxError, match="has no token '<nope>'"):
    vocabularies.get_vocabulary(f"hf:{path}?eos=<nope>&pad=<s>")
  with pytest.raises(RestJaxError, match="only pad=TOKEN and eos=TOKEN"):
    vocabularies.get_vocabulary(f"hf:{path}?bos=<s>")


def test_spm_vocabulary(tmp_path):
  path = build_spm(str(tmp_path))
  vocab = vocabularies.get_vocabulary(f"spm:{path}")
  assert isinstance(vocab, seqio.SentencePieceVocabulary)
  assert (vocab.pad_id, vocab.eos_id, vocab.vocab_size) == (0, 1, 30)
  ids = vocab.encode("the cat sat")
  assert min(ids) >= 3 and vocab.decode(ids) == "the cat sat"
  # Default spm ids (unk 0, bos 1, eos 2, no pad) break the convention: refused with the flags.
  other = build_spm(str(tmp_path), t5_ids=False, name="default_ids")
  with pytest.raises(RestJaxError, match="--pad_id=0 --eos_id=1"):
    vocabularies.get_vocabulary(f"spm:{other}")


@pytest.mark.parametrize("spec, match", [
    ("bpe:/x", "not understood"), ("hf:/no/such/tokenizer.json", "does not exist"),
    ("spm:/no/such.model", "does not exist")])
def test_bad_specs(spec, match):
  with pytest.raises(RestJaxError, match=match):
    vocabularies.get_vocabulary(spec)
