"""Hugging Face checkpoint import/export for Llama, Qwen2 and Qwen3.

    model, config = hf.load("/ckpt/Qwen3-0.6B")                     # one device
    model, config = hf.load(path, mesh=mesh, rules=rules)           # sharded as read
    hf.save(model, config, "/out/dir")   # AutoModelForCausalLM.from_pretrained("/out/dir")

A checkpoint is a directory with `config.json` and either `model.safetensors`
or shards listed in `model.safetensors.index.json`. Neither torch nor
transformers is needed: safetensors files are validated against their real size
(models/safetensors_file.py) and memory-mapped with numpy, and each parameter is
assembled from the slices the devices need (`jax.make_array_from_callback`), so
with a mesh no device, and no host buffer, ever holds more than its own shard of
a tensor, and a corrupt or hostile file is a ValueError naming the file and the
tensor before anything is allocated.

Layouts (HF `nn.Linear` weights are [out, in]; ours are [in..., out...]; L is
the stacked `layers` axis, H/K query/kv heads, Hd head_dim, M mlp width):

  model.embed_tokens.weight          [V, D]      embed                    [V, D]
  lm_head.weight                     [V, D]      lm_head.kernel           [D, V]
  model.norm.weight                  [D]         final_norm.scale         [D]
  model.layers.{l}.
    input_layernorm.weight           [D]         layers.attn_norm.scale   [L, D]
    post_attention_layernorm.weight  [D]         layers.mlp_norm.scale    [L, D]
    self_attn.q_proj.weight/bias     [H*Hd, D]   layers.attn.q_proj.kernel [L, D, H, Hd]
    self_attn.k_proj/v_proj ...      [K*Hd, D]   layers.attn.k_proj.kernel [L, D, K, Hd]
    self_attn.o_proj.weight          [D, H*Hd]   layers.attn.o_proj.kernel [L, H, Hd, D]
    self_attn.q_norm/k_norm.weight   [Hd]        layers.attn.q_norm.scale  [L, Hd]
    mlp.gate_proj/up_proj.weight     [M, D]      layers.mlp.gate.kernel    [L, D, M]
    mlp.down_proj.weight             [D, M]      layers.mlp.down.kernel    [L, M, D]

RoPE is the rotate-half layout in both, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from models import safetensors_file
from models.partitioning import partition_spec  # noqa: F401 (re-exported: hf.partition_spec)
from models.transformer import DTYPES, Config, Transformer

ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Buffers some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# The safetensors dtypes a parameter may be stored in (any other is an error naming the tensor).
_SAFETENSORS_DTYPES = {
  name: safetensors_file.DTYPES[name] for name in ("F64", "F32", "F16", "BF16")
}
_NUMPY_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


# -- config ------------------------------------------------------------------------------


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling for Config) from legacy or transformers-5 fields."""
  params = hf.get("rope_parameters") or {}
  if params and not isinstance(params, dict):
    raise ValueError(f"config.json rope_parameters={params!r}: expected a dict")
  if params and all(isinstance(v, dict) for v in params.values()):
    raise ValueError("config.json rope_parameters: per-layer-type RoPE is not supported")
  scaling = hf.get("rope_scaling") or {}
  merged = {**scaling, **params}
  theta = float(merged.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(
      f"config.json rope_scaling rope_type={kind!r} is not supported; supported: {ROPE_TYPES}"
    )
  partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise ValueError(f"config.json partial_rotary_factor={partial!r}: only 1.0 is supported")
  if kind == "default":
    return theta, None
  keys = (
    ("factor",)
    if kind == "linear"
    else ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  )
  missing = [k for k in keys if k not in merged]
  if missing:
    raise ValueError(f"config.json rope_scaling ({kind}) lacks {missing}")
  return theta, {"rope_type": kind, **{k: merged[k] for k in keys}}


def _sliding_window_from_hf(hf: dict, num_layers: int) -> int | None:
  if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
    return None
  layer_types = hf.get("layer_types") or [
    "sliding_attention" if i >= hf.get("max_window_layers", 0) else "full_attention"
    for i in range(num_layers)
  ]
  sliding = [t == "sliding_attention" for t in layer_types]
  if not any(sliding):
    return None
  if not all(sliding):
    raise ValueError(
      f"config.json layer_types={layer_types!r}: sliding window on only some layers is not "
      "supported (Config.sliding_window applies to every layer)"
    )
  return int(hf["sliding_window"])


def config_from_hf(hf: dict, dtype: str = "float32") -> Config:
  """Our Config from a Hugging Face config.json dict; ValueError names the bad field."""
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(
      f"config.json model_type={model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}"
    )
  for arch in hf.get("architectures") or ():
    if arch != ARCHITECTURES[model_type]:
      raise ValueError(
        f"config.json architectures={hf['architectures']!r} is not supported "
        f"for model_type={model_type!r}; expected {ARCHITECTURES[model_type]!r}"
      )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
  if hf.get("mlp_bias"):
    raise ValueError("config.json mlp_bias=True is not supported")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
  for field in (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
  ):
    if field not in hf:
      raise ValueError(f"config.json lacks required field {field!r}")
  heads = hf["num_attention_heads"]
  theta, scaling = _rope_from_hf(hf)
  qkv_bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
  return Config(
    vocab_size=hf["vocab_size"],
    dim=hf["hidden_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    mlp_dim=hf["intermediate_size"],
    rope_theta=theta,
    rope_scaling=scaling,
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    qkv_bias=qkv_bias,
    qk_norm=model_type == "qwen3",
    sliding_window=_sliding_window_from_hf(hf, hf["num_hidden_layers"]),
    dtype=dtype,
    param_dtype=dtype,
  )


def model_type_for(config: Config) -> str:
  """qwen3 if q/k norm, qwen2 if qkv bias, else llama."""
  if config.qk_norm:
    return "qwen3"
  return "qwen2" if config.qkv_bias else "llama"


def _has_o_proj_bias(model_type: str, config: Config) -> bool:
  """Llama/Qwen3 `attention_bias` puts a bias on o_proj too; ours must be zero."""
  return model_type != "qwen2" and config.qkv_bias


def config_to_hf(config: Config, *, dtype: str, max_position_embeddings: int) -> dict:
  """A config.json dict transformers builds the same architecture from."""
  c = config
  model_type = model_type_for(c)
  if c.sliding_window is not None and model_type == "llama":
    raise ValueError(
      f"model.sliding_window={c.sliding_window}: Llama checkpoints have no "
      "sliding window (only qwen2/qwen3, i.e. qkv_bias or qk_norm)"
    )
  hf = {
    "architectures": [ARCHITECTURES[model_type]],
    "model_type": model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.dim,
    "intermediate_size": c.mlp_dim,
    "num_hidden_layers": c.num_layers,
    "num_attention_heads": c.num_heads,
    "num_key_value_heads": c.num_kv_heads,
    "head_dim": c.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": max_position_embeddings,
    "rms_norm_eps": c.norm_eps,
    "rope_theta": c.rope_theta,
    "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
    "tie_word_embeddings": c.tie_embeddings,
    "torch_dtype": dtype,
    "use_cache": True,
  }
  if model_type != "qwen2":
    hf["attention_bias"] = c.qkv_bias
  if model_type == "llama":
    hf["mlp_bias"] = False
  else:
    window = c.sliding_window
    hf.update(
      use_sliding_window=window is not None,
      sliding_window=window,
      max_window_layers=0 if window is not None else c.num_layers,
      layer_types=[
        ("sliding_attention" if window is not None else "full_attention")
        for _ in range(c.num_layers)
      ],
    )
  return hf


# -- tensor mapping ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorMap:
  """One of our parameters and the HF tensor(s) it comes from.

  `hf_name` has a `{layer}` field when the parameter is stacked over layers.
  `to_ours` maps an HF array to our layout using only views (reshape of a
  contiguous array, transpose), so slicing its result reads only that slice.
  """

  path: tuple[str, ...]
  hf_name: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def stacked(self) -> bool:
    return "{layer}" in self.hf_name

  def hf_names(self, num_layers: int) -> list[str]:
    if not self.stacked:
      return [self.hf_name]
    return [self.hf_name.format(layer=i) for i in range(num_layers)]


def _identity(x):
  return x


def _transpose(x):
  return x.T


def _tensor_maps(c: Config) -> list[_TensorMap]:
  d, m, hd = c.dim, c.mlp_dim, c.head_dim
  pre = "model.layers.{layer}."
  maps = [
    _TensorMap(("embed",), "model.embed_tokens.weight", (c.vocab_size, d), _identity, _identity),
    _TensorMap(
      ("layers", "attn_norm", "scale"), pre + "input_layernorm.weight", (d,), _identity, _identity
    ),
  ]
  for proj, heads in (
    ("q_proj", c.num_heads),
    ("k_proj", c.num_kv_heads),
    ("v_proj", c.num_kv_heads),
  ):
    maps.append(
      _TensorMap(
        ("layers", "attn", proj, "kernel"),
        pre + f"self_attn.{proj}.weight",
        (heads * hd, d),
        lambda w, h=heads: w.reshape(h, hd, d).transpose(2, 0, 1),
        lambda k, h=heads: k.transpose(1, 2, 0).reshape(h * hd, d),
      )
    )
    if c.qkv_bias:
      maps.append(
        _TensorMap(
          ("layers", "attn", proj, "bias"),
          pre + f"self_attn.{proj}.bias",
          (heads * hd,),
          lambda b, h=heads: b.reshape(h, hd),
          lambda b, h=heads: b.reshape(h * hd),
        )
      )
  maps.append(
    _TensorMap(
      ("layers", "attn", "o_proj", "kernel"),
      pre + "self_attn.o_proj.weight",
      (d, c.num_heads * hd),
      lambda w: w.reshape(d, c.num_heads, hd).transpose(1, 2, 0),
      lambda k: k.transpose(2, 0, 1).reshape(d, c.num_heads * hd),
    )
  )
  if c.qk_norm:
    for norm in ("q_norm", "k_norm"):
      maps.append(
        _TensorMap(
          ("layers", "attn", norm, "scale"),
          pre + f"self_attn.{norm}.weight",
          (hd,),
          _identity,
          _identity,
        )
      )
  maps += [
    _TensorMap(
      ("layers", "mlp_norm", "scale"),
      pre + "post_attention_layernorm.weight",
      (d,),
      _identity,
      _identity,
    ),
    _TensorMap(
      ("layers", "mlp", "gate", "kernel"),
      pre + "mlp.gate_proj.weight",
      (m, d),
      _transpose,
      _transpose,
    ),
    _TensorMap(
      ("layers", "mlp", "up", "kernel"), pre + "mlp.up_proj.weight", (m, d), _transpose, _transpose
    ),
    _TensorMap(
      ("layers", "mlp", "down", "kernel"),
      pre + "mlp.down_proj.weight",
      (d, m),
      _transpose,
      _transpose,
    ),
    _TensorMap(("final_norm", "scale"), "model.norm.weight", (d,), _identity, _identity),
  ]
  if not c.tie_embeddings:
    maps.append(
      _TensorMap(("lm_head", "kernel"), "lm_head.weight", (c.vocab_size, d), _transpose, _transpose)
    )
  return maps


def _o_proj_bias_names(c: Config) -> list[str]:
  return [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(c.num_layers)]


# -- checkpoint directory (validated, memory-mapped safetensors) ------------------------------

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_DIRECTORY_CONTENTS = (
  f"a Hugging Face checkpoint directory holds {CONFIG_FILE} and either {SINGLE_FILE} or "
  f"{INDEX_FILE} with the *.safetensors shards it lists"
)


def _read_json(path: str) -> Any:
  """The JSON in `path`; ValueError naming the file when it is not UTF-8 JSON."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None


def _weight_map(path: str) -> dict[str, str]:
  """{tensor name: shard file name} from the index, each shard a file in `path`."""
  index_path = os.path.join(path, INDEX_FILE)
  index = _read_json(index_path)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index_path}: has no weight_map object ({{tensor name: shard file}})")
  for name, file_name in weight_map.items():
    # A shard is a plain file next to the index; anything else could read outside `path`.
    if not isinstance(file_name, str) or os.path.basename(file_name) != file_name:
      raise ValueError(
        f"{index_path}: tensor {name!r} is mapped to {file_name!r}, which is not a file name"
      )
    if not os.path.isfile(os.path.join(path, file_name)):
      raise FileNotFoundError(
        f"{index_path}: tensor {name!r} is in shard {file_name!r}, which is not in {path} "
        "(an incomplete download?)"
      )
  return weight_map


class _Checkpoint:
  """All tensors of a checkpoint directory, by name, every file validated as it is opened."""

  def __init__(self, path: str):
    if os.path.exists(os.path.join(path, INDEX_FILE)):
      weight_map = _weight_map(path)
      names = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
      weight_map, names = None, [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; {_DIRECTORY_CONTENTS}")
    self.files = {
      name: safetensors_file.SafetensorsFile(os.path.join(path, name)) for name in names
    }
    self.where: dict[str, safetensors_file.SafetensorsFile] = {}
    for file in self.files.values():
      for name in file.entries:
        if name in self.where:
          raise ValueError(
            f"{path}: tensor {name!r} is in both {self.where[name].path} and {file.path}"
          )
        self.where[name] = file
    if weight_map is not None:
      for name, file_name in weight_map.items():
        if self.where.get(name) is not self.files[file_name]:
          raise ValueError(
            f"{os.path.join(path, INDEX_FILE)} lists tensor {name!r} in "
            f"{file_name}, which does not contain it"
          )

  def names(self) -> set[str]:
    return set(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def array(self, name: str) -> np.ndarray:
    return self.where[name].array(name)


def _check_tensors(ckpt: _Checkpoint, config: Config, model_type: str, path: str) -> None:
  """ValueError naming the first missing/extra/misshapen tensor, before any model is built."""
  expected: dict[str, tuple[int, ...]] = {}
  for tmap in _tensor_maps(config):
    for name in tmap.hf_names(config.num_layers):
      expected[name] = tmap.hf_shape
  optional = set()
  if _has_o_proj_bias(model_type, config):
    for name in _o_proj_bias_names(config):
      expected[name] = (config.dim,)
  if config.tie_embeddings:
    optional.add("lm_head.weight")  # Some tied checkpoints store a copy; it is ignored.
  present = ckpt.names()
  missing = [n for n in expected if n not in present]
  if missing:
    raise ValueError(
      f"{path}: checkpoint is missing tensor {missing[0]!r} (expected shape "
      f"{expected[missing[0]]})"
      + (f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else "")
    )
  extra = sorted(
    n for n in present - expected.keys() - optional if not _IGNORED_TENSORS.fullmatch(n)
  )
  if extra:
    raise ValueError(
      f"{path}: checkpoint has unexpected tensor {extra[0]!r} (shape {ckpt.shape(extra[0])}) "
      f"that a {model_type} model with this config.json does not have"
      + (f"; {len(extra) - 1} more: {extra[1:6]}" if len(extra) > 1 else "")
    )
  for name, shape in expected.items():
    if ckpt.shape(name) != shape:
      raise ValueError(
        f"{path}: tensor {name!r} has shape {ckpt.shape(name)}; config.json "
        f"implies expected shape {shape}"
      )
    dtype = ckpt.where[name].dtype_name(name)
    if dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(
        f"{path}: tensor {name!r} has dtype {dtype}; supported: {sorted(_SAFETENSORS_DTYPES)}"
      )
  if _has_o_proj_bias(model_type, config):
    for name in _o_proj_bias_names(config):
      if np.any(ckpt.array(name)):
        raise ValueError(
          f"{path}: tensor {name!r} is nonzero; o_proj biases are not supported "
          "(attention_bias=True is only loadable with zero o_proj bias)"
        )


def _read_callback(ckpt: _Checkpoint, tmap: _TensorMap, num_layers: int, dtype):
  """index (tuple of slices into our global shape) -> numpy shard, reading only that slice."""
  names = tmap.hf_names(num_layers)

  def read(index):
    if tmap.stacked:
      rest = tuple(index[1:])
      shard = np.stack(
        [tmap.to_ours(ckpt.array(names[i]))[rest] for i in range(num_layers)[index[0]]]
      )
    else:
      shard = tmap.to_ours(ckpt.array(names[0]))[tuple(index)]
    return np.ascontiguousarray(shard.astype(dtype))

  return read


# -- public API ----------------------------------------------------------------------------


def load_config(path: str, dtype: str = "float32") -> tuple[Config, dict]:
  """(our Config, the raw config.json dict) of a checkpoint directory.

  FileNotFoundError names the directory and what it must hold when config.json is
  missing; ValueError names the file when it is not a JSON object.
  """
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    what = "no such directory" if not os.path.isdir(path) else f"no {CONFIG_FILE}"
    raise FileNotFoundError(f"{path}: {what}; {_DIRECTORY_CONTENTS}")
  hf = _read_json(config_path)
  if not isinstance(hf, dict):
    raise ValueError(f"{config_path}: a JSON {type(hf).__name__}, not an object")
  return config_from_hf(hf, dtype), hf


def load(
  path: str,
  dtype: str = "float32",
  mesh: Mesh | None = None,
  rules: Iterable[tuple[str, Any]] | None = None,
) -> tuple[Transformer, Config]:
  """Loads a Llama / Qwen2 / Qwen3 safetensors checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors (or the sharded
      model.safetensors.index.json + shards).
    dtype: parameter and compute dtype name ("float32", "bfloat16", "float16").
    mesh: if given, every parameter is created as a NamedSharding array on it,
      each device's shard read straight from the memory-mapped files.
    rules: (logical_axis, mesh_axis | None) pairs mapping the parameters'
      `logical_axes` metadata to the mesh (see `partition_spec`); without rules
      everything is replicated.

  Returns:
    (model, config). Raises ValueError naming the field or tensor when the
    config is unsupported, a file is not valid JSON / safetensors, or the
    tensors do not match the config, and FileNotFoundError naming the directory
    when config.json or the weights are missing; all before allocating any
    parameter.
  """
  config, hf = load_config(path, dtype)
  ckpt = _Checkpoint(path)
  _check_tensors(ckpt, config, hf["model_type"], path)

  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  variables = dict(nnx.to_flat_state(state))
  maps = {tmap.path: tmap for tmap in _tensor_maps(config)}
  if set(variables) != set(maps):
    raise AssertionError(
      f"hf mapping out of date with Transformer: {set(variables) ^ set(maps)}"
    )  # a bug in this file, not the input
  device = jax.local_devices()[0]
  for var_path, variable in variables.items():
    if mesh is None:
      sharding = jax.sharding.SingleDeviceSharding(device)
    else:
      axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
      sharding = NamedSharding(mesh, partition_spec(axes, variable.shape, mesh, rules))
    np_dtype = np.dtype(variable.dtype)
    array = jax.make_array_from_callback(
      variable.shape, sharding, _read_callback(ckpt, maps[var_path], config.num_layers, np_dtype)
    )
    variable.set_value(array)
  return nnx.merge(graphdef, state), config


def _shard_plan(
  tensors: list[tuple[str, tuple[int, ...], Callable]], dtype: np.dtype, max_shard_bytes: int
) -> list[list]:
  shards, current, size = [], [], 0
  for entry in tensors:
    nbytes = math.prod(entry[1]) * dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  if current:
    shards.append(current)
  return shards


def _write_safetensors(file_path: str, tensors: list, dtype: np.dtype) -> None:
  """Streams tensors (name, shape, produce()) into one safetensors file."""
  header, offset = {}, 0
  for name, shape, _ in tensors:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {
      "dtype": _NUMPY_TO_SAFETENSORS[dtype],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  header_bytes = json.dumps(header, separators=(",", ":")).encode()
  header_bytes += b" " * (-len(header_bytes) % 8)
  with open(file_path, "wb") as f:
    f.write(len(header_bytes).to_bytes(8, "little"))
    f.write(header_bytes)
    for name, shape, produce in tensors:
      array = np.ascontiguousarray(produce(), dtype=dtype)
      if array.shape != tuple(shape):
        raise AssertionError(f"{name}: produced {array.shape}, header says {shape}")
      f.write(array.tobytes())


def save(
  model: Transformer,
  config: Config,
  path: str,
  dtype: str | None = None,
  *,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
  max_position_embeddings: int = 32768,
  extra_config: dict | None = None,
  generation_config: dict | None = None,
) -> None:
  """Writes a checkpoint that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  Args:
    model, config: the model to export and its Config.
    path: output directory (created).
    dtype: storage dtype name; default the model's `param_dtype`.
    max_shard_bytes: above this total size the weights are split into
      model-0000i-of-0000n.safetensors files with model.safetensors.index.json.
    max_position_embeddings: written to config.json (our Config has no limit).
    extra_config: merged into config.json last, e.g. {"bos_token_id": ..,
      "eos_token_id": ..} from the source checkpoint (`load_config(path)[1]`);
      without them transformers assumes its per-architecture defaults.
    generation_config: if given, written as generation_config.json.

  The model's arrays must be addressable from this process (single host);
  one stacked parameter at a time is copied to host memory.
  """
  dtype = dtype or config.param_dtype
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {sorted(DTYPES)}")
  np_dtype = np.dtype(DTYPES[dtype])
  hf = config_to_hf(config, dtype=dtype, max_position_embeddings=max_position_embeddings)
  hf.update(extra_config or {})
  model_type = hf["model_type"]
  values = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for p, value in values.items():
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      raise ValueError(
        f"hf.save: parameter {'.'.join(p)} spans several processes; "
        "gather it first (multi-host export is not supported)"
      )

  tensors = []
  for tmap in _tensor_maps(config):
    value = values[tmap.path]
    if tmap.stacked:
      for i, name in enumerate(tmap.hf_names(config.num_layers)):
        tensors.append(
          (
            name,
            tmap.hf_shape,
            lambda v=value, i=i, f=tmap.to_hf: f(np.asarray(jax.device_get(v[i]))),
          )
        )
    else:
      tensors.append(
        (
          tmap.hf_name,
          tmap.hf_shape,
          lambda v=value, f=tmap.to_hf: f(np.asarray(jax.device_get(v))),
        )
      )
  if _has_o_proj_bias(model_type, config):
    for name in _o_proj_bias_names(config):
      tensors.append((name, (config.dim,), lambda: np.zeros((config.dim,), np_dtype)))
  order = {name: i for i, name in enumerate(t[0] for t in tensors)}
  tensors.sort(key=lambda t: _hf_sort_key(t[0], order[t[0]]))

  os.makedirs(path, exist_ok=True)
  shards = _shard_plan(tensors, np_dtype, max_shard_bytes)
  stale = ["model.safetensors", "model.safetensors.index.json"]
  stale += [n for n in os.listdir(path) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)]
  for name in stale:
    if os.path.exists(os.path.join(path, name)):
      os.remove(os.path.join(path, name))
  if len(shards) == 1:
    _write_safetensors(os.path.join(path, "model.safetensors"), shards[0], np_dtype)
  else:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _write_safetensors(os.path.join(path, file_name), shard, np_dtype)
      for name, shape, _ in shard:
        weight_map[name] = file_name
        total += math.prod(shape) * np_dtype.itemsize
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if generation_config is not None:
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump(generation_config, f, indent=2)


def _hf_sort_key(name: str, fallback: int):
  """Layer-major order (embed, layer 0, layer 1, ..., norm, head), so shards split by layer."""
  match = re.match(r"model\.layers\.(\d+)\.", name)
  if match:
    return (1, int(match.group(1)), fallback)
  if name == "model.embed_tokens.weight":
    return (0, 0, fallback)
  return (2, 0, fallback)
