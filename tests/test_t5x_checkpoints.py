"""T5X checkpoints as t5x users have them: specs resolved to where the checkpoint is (a local
copy of a GCS checkpoint, ``..`` paths, gs://), per-host block reads under a sharded Layout,
and an export that t5x restores (its ``param_states``; t5x itself checks it in
tests/interop/t5x_interop.py, see docs/checkpoints.md).
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from flax import serialization

from rest_jax.checkpoints.convert import load_checkpoint, load_t5x, save_t5x, t5x
from rest_jax.checkpoints.convert.params import abstract_params, host_arrays
from rest_jax.errors import RestJaxError
from rest_jax.models import ModelConfig
from conftest import mesh_layout

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
T5X_DIR = os.path.join(DATA, "t5x_tiny_t5_1_1")
CKPT = os.path.join(T5X_DIR, "checkpoint_200")
CONFIG = ModelConfig(kind="encdec", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=4,
                     head_dim=8, mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2)


@pytest.fixture(scope="module")
def reference():
  """The fixture's params, read whole on one device."""
  return dict(host_arrays(load_t5x(CKPT, config=CONFIG, layout=mesh_layout(
      devices=jax.devices()[:1]))))


def _assert_same(params, reference):
  got = dict(host_arrays(params))
  assert got.keys() == reference.keys()
  for key in got:
    np.testing.assert_array_equal(got[key], reference[key], err_msg=key)


def _read_msgpack(path):
  with open(os.path.join(path, "checkpoint"), "rb") as f:
    return serialization.msgpack_restore(f.read())


def _write_msgpack(path, tree):
  with open(os.path.join(path, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(tree))


def test_import_of_a_path_with_dotdot(tmp_path, monkeypatch, reference):
  """`rest-jax import --from t5x ../ckpts/checkpoint_200 ...` (TensorStore refuses `..`):
  the CLI's call, load_checkpoint, on that relative path."""
  shutil.copytree(CKPT, tmp_path / "ckpts" / "checkpoint_200")
  (tmp_path / "work").mkdir()
  monkeypatch.chdir(tmp_path / "work")
  _, params = load_checkpoint("t5x:../ckpts/checkpoint_200", config=CONFIG)
  _assert_same(params, reference)


def test_gcs_and_gfile_specs_read_from_the_local_copy(tmp_path, reference):
  """A checkpoint t5x wrote on GCS (``gcs`` driver, placeholder bucket), copied to disk; some
  specs in the tensorstore < 0.1.14 layout (path beside the kvstore) or the ``gfile`` driver."""
  ckpt = str(tmp_path / "checkpoint_200")
  shutil.copytree(CKPT, ckpt)
  tree = _read_msgpack(ckpt)
  for i, (_, spec) in enumerate(sorted(_specs(tree["optimizer"]["target"]))):
    rel = spec["kvstore"]["path"]
    if i % 3 == 0:
      spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": rel}
    elif i % 3 == 1:
      spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket"}
      spec["path"] = rel
    else:
      spec["kvstore"]["driver"] = "gfile"
  _write_msgpack(ckpt, tree)
  _assert_same(load_t5x(ckpt, config=CONFIG), reference)


def _specs(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict) and "driver" in value:
      yield prefix + key, value
    elif isinstance(value, dict):
      yield from _specs(value, prefix + key + ".")


def test_specs_resolve_to_gs_urls_and_normalised_local_paths():
  gcs = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket",
                                       "path": "target.x.kernel/"}, "metadata": {"shape": [2]}}
  local = {"driver": "zarr", "kvstore": {"driver": "file", "path": "target.x.kernel/"}}
  assert t5x.resolve_spec("gs://bkt/run/checkpoint_9", gcs) == {"driver": "zarr", "kvstore": {
      "driver": "gcs", "bucket": "bkt", "path": "run/checkpoint_9/target.x.kernel/"}}
  assert t5x.resolve_spec("gs://bkt/run/checkpoint_9", local)["kvstore"] == {
      "driver": "gcs", "bucket": "bkt", "path": "run/checkpoint_9/target.x.kernel/"}
  ckpt_dir = t5x.checkpoint_dir("a/../b/checkpoint_9/")
  assert ckpt_dir == os.path.join(os.getcwd(), "b", "checkpoint_9")
  assert t5x.resolve_spec(ckpt_dir, gcs)["kvstore"] == {
      "driver": "file", "path": os.path.join(ckpt_dir, "target.x.kernel/")}
  assert t5x.checkpoint_dir("gs://bkt/run/checkpoint_9/") == "gs://bkt/run/checkpoint_9"
  with pytest.raises(RestJaxError, match="unsupported TensorStore kvstore"):
    t5x.resolve_spec(ckpt_dir, {"driver": "zarr", "kvstore": {"driver": "s3", "path": "x/"}})


def test_each_block_is_read_once_and_only_its_domain(monkeypatch, reference):
  """8 devices (data 2 x fsdp 2 x tensor 2): every tensor is read as the distinct blocks its
  devices hold, each once (data replicas share a read), so each stored value is read once."""
  reads = []
  real = t5x.read_domain

  def recording(source, index):
    reads.append((source.kvstore.path, tuple(source.shape),
                  tuple((s.start, s.stop) for s in index)))
    return real(source, index)

  monkeypatch.setattr(t5x, "read_domain", recording)
  params = load_t5x(CKPT, config=CONFIG, layout=mesh_layout(data=2, fsdp=2, tensor=2))
  _assert_same(params, reference)
  assert len(reads) == len(set(reads))
  assert sum(int(np.prod([b - a for a, b in domain])) for _, _, domain in reads) == 53_888
  attention = [(0, 16), (16, 32)]
  by_shape = {}
  for _, shape, domain in reads:
    by_shape.setdefault(shape, set()).add(domain)
  # [embed, heads*kv] (q/k/v, embed over fsdp, heads over tensor) and [heads*kv, embed] (out).
  assert by_shape[(32, 32)] == {(r, c) for r in attention for c in attention}
  assert by_shape[(4, 32)] == {((0, 2), (0, 32)), ((2, 4), (0, 32))}  # relpos: heads / tensor.
  assert by_shape[(32,)] == {((0, 16),), ((16, 32),)}  # Norm scales over fsdp.


def test_a_block_across_merged_axes():
  """Our [heads, kv, embed] block of a t5x [heads*kv, embed] kernel, kv axis cut too."""
  stored = np.arange(32 * 6, dtype=np.float32).reshape(32, 6)
  ours = stored.reshape(4, 8, 6)
  for index in [(slice(1, 3), slice(0, 8), slice(2, 4)), (slice(0, 4), slice(2, 6), slice(0, 6))]:
    np.testing.assert_array_equal(
        t5x._read_block(stored, "a.out.kernel", (4, 8, 6), index), ours[index])  # pylint: disable=protected-access


FACTORED = ModelConfig(kind="encdec", vocab_size=256, d_model=128, num_heads=4, num_kv_heads=4,
                       head_dim=32, mlp_dim=256, num_encoder_layers=1, num_decoder_layers=1)


def test_export_writes_the_adafactor_param_states_t5x_restores(tmp_path):
  """Shapes as t5x's own Adafactor makes them (checked against t5x in tests/interop)."""
  params = jax.tree.map(lambda x: np.ones(x.shape, x.dtype), abstract_params(FACTORED))
  out = str(tmp_path / "checkpoint_3")
  save_t5x(out, FACTORED, params, step=3)
  tree = _read_msgpack(out)["optimizer"]
  assert int(tree["state"]["step"]) == 3
  states = tree["state"]["param_states"]
  assert sorted(n for n, _ in _specs(tree["target"])) == sorted(
      n.rsplit(".", 1)[0] for n in _leaves(states) if n.endswith(".m"))

  def shapes(name):
    node = states
    for key in name.split("."):
      node = node[key]
    return {k: tuple(v["metadata"]["shape"]) if isinstance(v, dict) else v.shape
            for k, v in node.items()}

  one = (1,)
  # Factored (both axes >= 128): v_row drops the largest axis, v_col the second largest.
  assert shapes("token_embedder.embedding") == {"m": one, "v": one, "v_row": (128,),
                                                "v_col": (256,)}
  assert shapes("encoder.layers_0.mlp.wo.kernel") == {"m": one, "v": one, "v_row": (128,),
                                                      "v_col": (256,)}
  assert shapes("encoder.layers_0.attention.out.kernel") == {"m": one, "v": one,
                                                             "v_row": (128,), "v_col": (128,)}
  # Not factored: a full `v`, stored as zarr like the param.
  assert shapes("encoder.relpos_bias.rel_embedding") == {"m": one, "v": (4, 32), "v_row": one,
                                                         "v_col": one}
  assert shapes("decoder.decoder_norm.scale") == {"m": one, "v": (128,), "v_row": one,
                                                  "v_col": one}
  v = states["encoder"]["relpos_bias"]["rel_embedding"]["v"]
  assert v["kvstore"] == {"driver": "file",
                          "path": "state.param_states.encoder.relpos_bias.rel_embedding.v/"}
  assert not np.any(t5x._read_block(t5x._open(out, v), "v", (4, 32), (slice(0, 4), slice(0, 32))))  # pylint: disable=protected-access


def test_adafactor_state_matches_a_real_t5x_checkpoint():
  """The fixture was trained by t5x (Adafactor, t5_1_1/base.gin): its dims < 128 are not
  factored; our fresh states have its shapes."""
  tree = _read_msgpack(CKPT)["optimizer"]
  states = tree["state"]["param_states"]
  for name, spec in _specs(tree["target"]):
    node = states
    for key in name.split("."):
      node = node[key]
    stored = {k: tuple(v["metadata"]["shape"]) if isinstance(v, dict) else v.shape
              for k, v in node.items()}
    assert stored == t5x.adafactor_state(tuple(spec["metadata"]["shape"])), name


def test_zarr_chunks_stay_under_64_mib():
  assert t5x.chunk_shape((32128, 4096), 4) == [4016, 4096]
  assert t5x.chunk_shape((64, 32), 4) == [64, 32]
  assert t5x.chunk_shape((10240, 4096), 2) == [5120, 4096]


def test_chunked_export_reads_back_by_block(tmp_path, monkeypatch, reference):
  """Tensors over the chunk size are split into zarr chunks; blocks read back exactly."""
  monkeypatch.setattr(t5x, "_CHUNK_BYTES", 4096)
  out = str(tmp_path / "checkpoint_0")
  save_t5x(out, CONFIG, load_t5x(CKPT, config=CONFIG))
  chunks = os.listdir(os.path.join(out, "target.token_embedder.embedding"))
  assert len([c for c in chunks if not c.startswith(".")]) == 2  # [64, 32] f32 in [32, 32].
  _assert_same(load_t5x(out, config=CONFIG, layout=mesh_layout(data=2, fsdp=2, tensor=2)),
               reference)


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict) and "driver" not in value:
      yield from _leaves(value, prefix + key + ".")
    else:
      yield prefix + key


TWO_HOSTS = """
import json, sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from rest_jax.checkpoints.convert import load_t5x, t5x
from rest_jax.checkpoints.convert.params import host_arrays
from rest_jax.config import MeshConfig
from rest_jax.models import ModelConfig
from rest_jax.parallel.meshes import layout_from_config
reads = []
real = t5x.read_domain
def recording(source, index):
  reads.append((source.kvstore.path, [[s.start, s.stop] for s in index]))
  return real(source, index)
t5x.read_domain = recording
config = ModelConfig(**json.loads(sys.argv[4]))
layout = layout_from_config(MeshConfig(data=1, fsdp=2, tensor=2, dcn_fsdp=2))
params = load_t5x(sys.argv[3], config=config, layout=layout)
full = dict(host_arrays(params))  # Gathered across both processes.
with open(sys.argv[5], "w") as f:
  json.dump({"reads": reads, "full": {k: v.tolist() for k, v in full.items()}}, f)
"""


@pytest.mark.slow
def test_two_hosts_read_only_their_blocks(tmp_path, reference):
  """2 processes x 4 CPU devices, fsdp across the processes: each process reads only the blocks
  its own devices hold (half of every fsdp-sharded tensor), and the gathered params are exact."""
  import json, socket, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONPATH=repo,
             XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  fields = {"kind": "encdec", "vocab_size": 64, "d_model": 32, "num_heads": 4, "num_kv_heads": 4,
            "head_dim": 8, "mlp_dim": 64, "num_encoder_layers": 2, "num_decoder_layers": 2}
  procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, f"127.0.0.1:{port}", str(i), CKPT,
                             json.dumps(fields), str(tmp_path / f"p{i}.json")], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"p{i}.log", "w"))  # pylint: disable=consider-using-with
           for i in range(2)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = "".join((tmp_path / f"p{i}.log").read_text()[-3000:] for i in range(2))
  assert codes == [0, 0], logs
  results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
  query = "target.encoder.layers_0.attention.query.kernel/"
  per_host = []
  for result in results:
    for key, value in result["full"].items():
      np.testing.assert_array_equal(np.asarray(value, np.float32), reference[key], err_msg=key)
    domains = [tuple(map(tuple, d)) for path, d in result["reads"] if path.endswith(query)]
    assert len(domains) == len(set(domains)) == 4  # Its 2 fsdp x 2 tensor devices' blocks.
    per_host.append(set(domains))
    read = sum(int(np.prod([b - a for a, b in d])) for _, d in result["reads"])
    # Half of each tensor split over fsdp; both relpos tables ([4, 32], tensor only) whole.
    assert read == (53_888 - 2 * 128) // 2 + 2 * 128
  assert not per_host[0] & per_host[1]  # The two hosts read different blocks...
  rows = sorted({d[0] for d in per_host[0] | per_host[1]})
  assert rows == [(0, 8), (8, 16), (16, 24), (24, 32)]  # ... that cover the tensor.


@pytest.mark.slow  # 53 s on 2 loaded cores: about 200 objects each way through the emulator.
def test_import_and_export_on_gcs(gcs_root):
  """On the shared GCS emulator (tests/gcs_emulator.py): a gs:// checkpoint whose specs name
  t5x's gcs driver and its placeholder bucket imports exactly, and an export to gs:// imports
  back."""
  from rest_jax import storage  # pylint: disable=g-import-not-at-top
  reference = dict(host_arrays(load_t5x(CKPT, config=CONFIG)))
  dst = storage.join(gcs_root, "model_dir", "checkpoint_200")
  with storage.atomic_dir(dst) as tmp:  # As t5x writes on GCS: its arrays' zarr folders...
    shutil.copytree(CKPT, tmp, dirs_exist_ok=True)
    os.remove(os.path.join(tmp, "checkpoint"))
  with open(os.path.join(CKPT, "checkpoint"), "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  for _, spec in _specs(tree):  # ... and gcs specs naming t5x's placeholder bucket.
    spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket",
                       "path": spec["kvstore"]["path"]}
  storage.write_bytes(storage.join(dst, "checkpoint"), serialization.msgpack_serialize(tree))
  got = dict(host_arrays(load_t5x(dst + "/", config=CONFIG)))
  out = storage.join(gcs_root, "export", "checkpoint_0")
  save_t5x(out, CONFIG, load_t5x(CKPT, config=CONFIG))
  back = dict(host_arrays(load_t5x(out, config=CONFIG)))
  assert got.keys() == back.keys() == reference.keys()
  for key, value in reference.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
    np.testing.assert_array_equal(back[key], value, err_msg=key)
