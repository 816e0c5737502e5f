"""Parity of models.hf against Hugging Face transformers (the independent reference).

Tiny Llama / Qwen2 / Qwen3 models are built by transformers from a config with
random weights (every parameter re-drawn, norms and biases included, so a
mis-mapped tensor cannot hide behind an init of ones or zeros), saved with
`save_pretrained`, and loaded with `hf.load`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from models import hf  # noqa: E402
from models.transformer import Config, Transformer  # noqa: E402

VOCAB = 128
BASE = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  rms_norm_eps=1e-6,
  max_position_embeddings=256,
  bos_token_id=None,
  eos_token_id=None,
  pad_token_id=None,
)
CASES = {
  "llama": ("llama", dict()),
  "llama_tied_mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
  "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
  "qwen3_qk_norm": ("qwen3", dict(head_dim=32)),  # head_dim != hidden/heads, as in Qwen3
  "llama3_rope_scaling": (
    "llama",
    dict(
      rope_theta=10_000.0,
      rope_scaling={
        # original_max_position_embeddings is small so that all three frequency
        # bands (kept, smoothed, divided) occur at head_dim 16 and short prompts.
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "qwen2_sliding_window": (
    "qwen2",
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
  ),
}
HF_CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def build_hf_model(kind: str, seed: int = 0, **overrides):
  """A transformers model with every parameter drawn at random."""
  config = getattr(transformers, HF_CONFIGS[kind])(**{**BASE, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, 0.15)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case name -> (HF model, checkpoint dir); built once per module."""
  out = {}
  for i, (case, (kind, overrides)) in enumerate(CASES.items()):
    model = build_hf_model(kind, seed=i, **overrides)
    path = tmp_path_factory.mktemp(case)
    model.save_pretrained(path, safe_serialization=True)
    out[case] = (model, str(path))
  return out


def hf_logits(model, tokens_BS, mask_BS=None):
  with torch.no_grad():
    kw = {} if mask_BS is None else {"attention_mask": torch.tensor(mask_BS)}
    return model(torch.tensor(tokens_BS), **kw).logits.float().numpy()


def our_logits(model, tokens_BS):
  return np.asarray(model(jnp.asarray(tokens_BS))[0])


def padded_batch(lengths, seed=0):
  rng = np.random.RandomState(seed)
  s = max(lengths)
  tokens = np.zeros((len(lengths), s), np.int64)
  mask = np.zeros((len(lengths), s), np.int64)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.randint(1, VOCAB, n)
    mask[b, :n] = 1
  return tokens, mask


def flat_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_padded_batch(checkpoints, case):
  hf_model, path = checkpoints[case]
  model, config = hf.load(path, dtype="float32")
  kind, overrides = CASES[case]
  assert config.qk_norm == (kind == "qwen3")
  assert config.qkv_bias == (kind == "qwen2")
  assert config.tie_embeddings == bool(overrides.get("tie_word_embeddings"))
  assert config.head_dim == overrides.get("head_dim", 16)
  assert config.sliding_window == overrides.get("sliding_window")
  hash(nnx.graphdef(model))  # static jit argument of models.decoding, rope_scaling included
  lengths = [20, 13, 5]
  tokens, mask = padded_batch(lengths)
  ref = hf_logits(hf_model, tokens, mask)
  ours = our_logits(model, tokens)  # right padding: causal masking hides the pads
  real = mask.astype(bool)
  diff = float(np.abs(ours[real] - ref[real]).max())
  print(f"\n{case}: max |logits diff| = {diff:.3g} (max |logit| {np.abs(ref[real]).max():.3g})")
  assert diff <= 1e-4, diff


@pytest.mark.parametrize("case", ["llama", "qwen2_bias_tied", "qwen3_qk_norm"])
def test_greedy_generation_matches_transformers(checkpoints, case):
  decoding = pytest.importorskip("models.decoding")
  hf_model, path = checkpoints[case]
  model, _ = hf.load(path)
  lengths = [9, 4, 7]
  tokens, _ = padded_batch(lengths, seed=1)
  out = decoding.generate(
    model, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), max_new_tokens=32
  )
  ours = np.asarray(out.tokens_BN)
  for b, n in enumerate(lengths):  # HF reference: each prompt alone, unpadded
    with torch.no_grad():
      ref = hf_model.generate(
        torch.tensor(tokens[b : b + 1, :n]),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )
    np.testing.assert_array_equal(ours[b], ref[0, n:].numpy(), err_msg=f"row {b}")


@pytest.mark.parametrize(
  "case",
  [
    "llama",
    "llama_tied_mha",
    "qwen2_bias_tied",
    "qwen3_qk_norm",
    "llama3_rope_scaling",
    "qwen2_sliding_window",
  ],
)
def test_save_loads_in_transformers_and_round_trips(checkpoints, case, tmp_path):
  hf_model, path = checkpoints[case]
  model, config = hf.load(path)
  out_dir = str(tmp_path / "exported")
  hf.save(model, config, out_dir)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  assert type(reloaded).__name__ == type(hf_model).__name__
  tokens, mask = padded_batch([11, 6])
  real = mask.astype(bool)
  np.testing.assert_array_equal(
    hf_logits(reloaded, tokens, mask)[real], hf_logits(hf_model, tokens, mask)[real]
  )
  # hf.load(hf.save(model)) gives back exactly the same parameters and config.
  again, config_again = hf.load(out_dir)
  assert config_again == config
  a, b = flat_params(model), flat_params(again)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.mark.parametrize(
  "overrides",
  [
    dict(qk_norm=True, qkv_bias=True),  # qwen3 + attention_bias: o_proj gets a zero bias
    dict(qk_norm=True, sliding_window=3, tie_embeddings=True),
    dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0),
  ],
  ids=["qwen3_attention_bias", "qwen3_sliding_tied", "llama_linear_rope"],
)
def test_save_of_our_own_model_matches_transformers(overrides, tmp_path):
  config = Config(
    vocab_size=VOCAB,
    dim=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=96,
    **overrides,
  )
  # Random parameters drawn here (cheaper than compiling the initialisers), with
  # non-trivial norms and biases so that their mapping is exercised too.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(0)
  for path, v in nnx.to_flat_state(state):
    noise = rng.randn(*v.shape).astype(np.float32)
    if path[-1] == "scale":
      v.set_value(jnp.asarray(1.0 + 0.2 * noise))
    else:
      v.set_value(jnp.asarray((0.5 if path[0] in ("embed", "lm_head") else 0.15) * noise))
  model = nnx.merge(graphdef, state)
  hf.save(model, config, str(tmp_path), max_position_embeddings=128)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  tokens, _ = padded_batch([12])
  diff = np.abs(hf_logits(reloaded, tokens) - our_logits(model, tokens)).max()
  assert diff <= 1e-4, diff


def test_sharded_checkpoints_load_and_save(checkpoints, tmp_path):
  hf_model, path = checkpoints["qwen3_qk_norm"]
  single, config = hf.load(path)
  hf_model.save_pretrained(tmp_path / "hf_sharded", safe_serialization=True, max_shard_size="40KB")
  names = os.listdir(tmp_path / "hf_sharded")
  assert "model.safetensors.index.json" in names and "model.safetensors" not in names
  sharded, config2 = hf.load(str(tmp_path / "hf_sharded"))
  assert config2 == config
  a, b = flat_params(single), flat_params(sharded)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))

  out_dir = tmp_path / "ours_sharded"
  hf.save(single, config, str(out_dir), max_shard_bytes=40_000)
  with open(out_dir / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) > 2
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
  tokens, _ = padded_batch([10])
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))
  c = flat_params(hf.load(str(out_dir))[0])
  for key in a:
    np.testing.assert_array_equal(a[key], c[key], err_msg=str(key))


def test_bfloat16_load_and_save(checkpoints, tmp_path):
  hf_model, path = checkpoints["llama"]
  model, config = hf.load(path, dtype="bfloat16")
  assert config.param_dtype == config.dtype == "bfloat16"
  assert model.embed.get_value().dtype == jnp.bfloat16
  hf.save(model, config, str(tmp_path), extra_config={"bos_token_id": 5, "eos_token_id": 6})
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
  assert (reloaded.config.bos_token_id, reloaded.config.eos_token_id) == (5, 6)
  ref = hf_model.model.embed_tokens.weight.to(torch.bfloat16)
  assert torch.equal(reloaded.model.embed_tokens.weight, ref)
  # A bfloat16 checkpoint read as float32 holds exactly the bfloat16 values.
  upcast, _ = hf.load(str(tmp_path), dtype="float32")
  a, b = flat_params(model), flat_params(upcast)
  for key in a:
    assert b[key].dtype == np.float32
    np.testing.assert_array_equal(a[key].astype(np.float32), b[key], err_msg=str(key))


RULES = (
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
)


def test_load_onto_mesh_places_each_tensor_with_its_sharding(checkpoints):
  hf_model, path = checkpoints["qwen3_qk_norm"]
  devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("fsdp", "tensor"))
  model, _ = hf.load(path, mesh=mesh, rules=RULES)
  params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  expected = {  # written out by hand from RULES and the layouts in models/hf.py
    ("embed",): P("tensor", "fsdp"),
    ("lm_head", "kernel"): P("fsdp", "tensor"),
    ("final_norm", "scale"): P("fsdp"),
    ("layers", "attn_norm", "scale"): P(None, "fsdp"),
    ("layers", "attn", "q_proj", "kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "k_proj", "kernel"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "o_proj", "kernel"): P(None, "tensor", None, "fsdp"),
    ("layers", "attn", "q_norm", "scale"): P(None, None),
    ("layers", "mlp", "gate", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
  }
  for key, spec in expected.items():
    array = params[key]
    assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (
      key,
      array.sharding,
    )
  single = flat_params(hf.load(path)[0])
  for key, array in params.items():
    shard_shape = array.sharding.shard_shape(array.shape)
    for shard in array.addressable_shards:
      assert shard.data.shape == shard_shape, key
      np.testing.assert_array_equal(np.asarray(shard.data), single[key][shard.index])
  tokens, _ = padded_batch([8])
  diff = np.abs(our_logits(model, tokens) - hf_logits(hf_model, tokens)).max()
  assert diff <= 1e-4


def test_mesh_load_agrees_with_train_sharding(checkpoints):
  """A loaded model sits where the trainer would put it (train/sharding.py's rules)."""
  sharding = pytest.importorskip("train.sharding")
  _, path = checkpoints["qwen2_bias_tied"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  rules = RULES + (("dummy", "data"),)
  model, _ = hf.load(path, mesh=mesh, rules=rules)
  expected = sharding.state_shardings(nnx.state(model, nnx.Param), mesh, rules)
  flat_expected = dict(nnx.to_flat_state(nnx.State(expected)))
  for key, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = variable.get_value()
    assert value.sharding.is_equivalent_to(flat_expected[key], value.ndim), key


def test_partition_spec_rules():
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
  rules = [("embed", "fsdp"), ("mlp", ("fsdp", "data")), ("heads", "tensor"), ("vocab", None)]
  assert hf.partition_spec(("embed", "mlp"), (64, 96), mesh, rules) == P("fsdp", "data")
  assert hf.partition_spec(("mlp", "embed"), (96, 64), mesh, rules) == P(("fsdp", "data"), None)
  assert hf.partition_spec(("mlp",), (6,), mesh, rules) == P(None)  # 6 % 8: replicated
  assert hf.partition_spec(("heads", "vocab", "layers", None), (4, 8, 2, 2), mesh, rules) == P(
    None, None, None, None
  )  # size-1 axis, None, unmapped
  assert hf.partition_spec(("embed",), (64,), mesh, None) == P(None)
  with pytest.raises(ValueError, match="'embed' appears twice"):
    hf.partition_spec(("embed",), (64,), mesh, rules + [("embed", "data")])
  with pytest.raises(ValueError, match="mesh has no axis 'model'"):
    hf.partition_spec(("embed",), (64,), mesh, [("embed", "model")])


# -- errors -------------------------------------------------------------------------------


def _copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst, exist_ok=True)
  tensors = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  safetensors_torch.save_file(
    tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"}
  )
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if edit_config:
    edit_config(config)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return str(dst)


def _no_model_built(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("model built before the checkpoint was validated")

  monkeypatch.setattr(hf, "Transformer", fail)


def test_errors_name_the_tensor_or_field(checkpoints, tmp_path, monkeypatch):
  _, path = checkpoints["qwen2_bias_tied"]
  _no_model_built(monkeypatch)
  name = "model.layers.1.self_attn.k_proj.bias"

  missing = _copy_checkpoint(path, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"missing tensor '{name}' \(expected shape \(32,\)\)"):
    hf.load(missing)

  def add_extra(t):
    t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)

  extra = _copy_checkpoint(path, tmp_path / "extra", add_extra)
  with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
    hf.load(extra)

  def reshape(t):
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)

  wrong = _copy_checkpoint(path, tmp_path / "wrong", reshape)
  with pytest.raises(
    ValueError,
    match=r"'model.layers.0.mlp.up_proj.weight' has shape "
    r"\(95, 64\).*expected shape \(96, 64\)",
  ):
    hf.load(wrong)

  def mistral(c):
    c["model_type"] = "mistral"

  with pytest.raises(ValueError, match=r"model_type='mistral' is not supported"):
    hf.load(_copy_checkpoint(path, tmp_path / "mistral", edit_config=mistral))

  def yarn(c):
    c["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}

  with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported"):
    hf.load(_copy_checkpoint(path, tmp_path / "yarn", edit_config=yarn))

  def gelu(c):
    c["hidden_act"] = "gelu"

  with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
    hf.load(_copy_checkpoint(path, tmp_path / "gelu", edit_config=gelu))


def test_nonzero_o_proj_bias_is_rejected(checkpoints, tmp_path):
  _, path = checkpoints["qwen3_qk_norm"]

  def with_bias(c):
    c["attention_bias"] = True

  def add_biases(t):
    for i in range(2):
      for proj, n in (("q_proj", 128), ("k_proj", 64), ("v_proj", 64), ("o_proj", 64)):
        t[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(n)
    t["model.layers.1.self_attn.o_proj.bias"][3] = 1.0

  bad = _copy_checkpoint(path, tmp_path / "bias", add_biases, with_bias)
  with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.o_proj.bias' is nonzero"):
    hf.load(bad)
