"""Device meshes and parameter/batch/cache shardings (data, FSDP and tensor parallelism).

One mesh with three named axes, outermost first:

    data    pure data parallelism: parameters replicated, batch split;
    fsdp    batch split *and* parameters/optimizer state split (ZeRO-3 style);
    tensor  parameters split along heads / MLP width (Megatron style), batch not split.

The batch's leading axis is split over ("data", "fsdp"); parameters follow an
ordered list of partition rules (big_vision / MaxText style): the first regex
that fully matches a parameter's '/'-joined path (e.g. "layers/q_proj") gives its
PartitionSpec. A dimension that its mesh axes do not divide is replicated instead
(logged once), so a tiny model runs on any mesh.

Nothing here changes the model code: jitted functions take their shardings from
their inputs (GSPMD propagation), so `steps.sft_step` / `steps.rl_step` /
`rollout.sample` run sharded as soon as the TrainState and the batch are.

    mesh = sharding.make_mesh(config.mesh)             # {"data": -1, "fsdp": 1, "tensor": 1}
    params = sharding.init_sharded_params(cfg, key, mesh)   # never whole on one device
    opt_state = sharding.init_opt_state(optimizer, params, mesh)
    batch = sharding.shard_batch(host_local_numpy_batch, mesh)
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fgrpo_jax.errors import UserError
from fgrpo_jax.models import llama, qwen3_5
from fgrpo_jax.models.decoders import decoder

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the leading batch dimension is split over these

# (regex fully matching the '/'-joined parameter path, PartitionSpec), first match wins.
# Kernels are [L, in, out]: the input side of q/k/v/gate/up and the output side of
# o/down are split over fsdp, the head / MLP-width side over tensor, so the two
# matmuls of a block need one reduction over tensor (Megatron) and FSDP gathers
# each weight just before use.
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"embed", P("tensor", "fsdp")),  # [V, h]: vocab over tensor, hidden over fsdp
    (r"lm_head", P("fsdp", "tensor")),  # [h, V] (the transpose of a tied embed)
    (r"layers/(q|k|v|gate|up)_proj", P(None, "fsdp", "tensor")),
    (r"layers/(o|down)_proj", P(None, "tensor", "fsdp")),
    (r"layers/(q|k|v)_bias", P(None, "tensor")),
    # Qwen3.5 (models/qwen3_5.py): attention layers like the above; the DeltaNet's input
    # projections split their output channels (heads) over tensor, its depthwise conv the
    # same channels, its output projection its input side (a Megatron pair again).
    (r"attn/(q|k|v)_proj", P(None, "fsdp", "tensor")),
    (r"attn/o_proj", P(None, "tensor", "fsdp")),
    (r"linear/in_proj_(qkv|z|a|b)", P(None, "fsdp", "tensor")),
    (r"linear/conv", P(None, None, "tensor")),
    (r"linear/out_proj", P(None, "tensor", "fsdp")),
    # LoRA adapters (models/lora.py): lora_a [L, in, r], lora_b [L, r, out] split like
    # the kernel's in / out sides, so lora_a @ lora_b lands in the kernel's layout.
    # (Qwen3.5's attn/ and linear/ kernels likewise.)
    (r"(layers|attn)/(q|k|v|gate|up)_proj/lora_a|linear/in_proj_(qkv|z|a|b)/lora_a",
     P(None, "fsdp")),
    (r"(layers|attn)/(q|k|v|gate|up)_proj/lora_b|linear/in_proj_(qkv|z|a|b)/lora_b",
     P(None, None, "tensor")),
    (r"(layers|attn)/(o|down)_proj/lora_a|linear/out_proj/lora_a", P(None, "tensor")),
    (r"(layers|attn)/(o|down)_proj/lora_b|linear/out_proj/lora_b", P(None, None, "fsdp")),
    (r".*", P()),  # norms, q/k norms, scalars: replicated (small)
)

_log = logging.getLogger(__name__)
_logged: set = set()


class MeshError(UserError):
  """config.mesh does not fit the devices: printed as one line by main."""


# ----------------------------------------------------------------------------
# Mesh.


def mesh_shape(mesh_cfg: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
  """Resolves a mesh config ({"data": -1, "fsdp": 2, ...}) to sizes of all AXES.

  Missing axes are 1; at most one axis may be -1 (= the remaining devices).
  """
  cfg = dict(mesh_cfg or {})
  shown = "{" + ", ".join(f"{k}: {v}" for k, v in cfg.items()) + "}"
  unknown = sorted(set(cfg) - set(AXES))
  if unknown:
    raise MeshError(f"config.mesh={shown} has unknown axes {unknown} "
                    f"(allowed: {', '.join(AXES)})")
  try:
    sizes = {a: int(cfg.get(a, 1)) for a in AXES}
  except (TypeError, ValueError):
    raise MeshError(f"config.mesh={shown}: sizes must be integers") from None
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise MeshError(f"config.mesh={shown}: sizes must be positive, with at most one -1 "
                    "(= the remaining devices)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"config.mesh={shown}: the fixed axes use {fixed} devices, which does "
                      f"not divide the {num_devices} devices available")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f"config.mesh={shown} needs {math.prod(sizes.values())} devices "
                    f"(data*fsdp*tensor) but {num_devices} are available; use -1 on one "
                    "axis to take the rest")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices=None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh over all devices (of all processes), Auto axes.

  Device order comes from `jax.make_mesh` (topology-aware on TPU; process-major
  elsewhere), so the outer "data" axis is the one that crosses hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------
# Specs (pure functions of shapes and axis sizes; testable without devices).


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(spec: P, shape: Sequence[int], axis_sizes: Mapping[str, int],
             name: str = "") -> P:
  """`spec` with every dimension its axes do not divide made replicated.

  A multi-axis entry such as ("data", "fsdp") keeps its longest prefix of axes
  that divides the dimension. Each change is logged once per (name, dim).
  """
  entries = tuple(spec)
  if len(entries) > len(shape):
    raise ValueError(f"partition spec {spec} of {name or 'an array'} has more entries than "
                     f"its shape {tuple(shape)}")
  out = []
  for dim, (size, entry) in enumerate(zip(shape, entries)):
    axes = _axes_of(entry)
    kept = []
    for a in axes:
      if a not in axis_sizes:
        raise ValueError(f"partition spec {spec} of {name or 'an array'} names mesh axis "
                         f"{a!r}, not one of {tuple(axis_sizes)}")
      if size % (math.prod(axis_sizes[b] for b in kept) * axis_sizes[a]):
        break
      kept.append(a)
    if len(kept) < len(axes):
      key = (name, dim, tuple(axes), size)
      if key not in _logged:
        _logged.add(key)
        _log.warning("sharding: %s dim %d (size %d) is not divisible by mesh axes %s of "
                     "sizes %s; using %s for it", name or "array", dim, size, axes,
                     [axis_sizes[a] for a in axes], tuple(kept) or "replicated")
    if not kept:
      out.append(None)
    else:
      out.append(tuple(kept) if isinstance(entry, (tuple, list)) else kept[0])
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def path_name(path) -> str:
  """'/'-joined names of a pytree key path: ('layers', 'q_proj') -> 'layers/q_proj'."""
  return "/".join(_key_names(path))


def _key_names(path) -> tuple[str, ...]:
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  return tuple(names)


def spec_for(name: str, shape: Sequence[int], axis_sizes: Mapping[str, int],
             rules=DEFAULT_RULES) -> P:
  """PartitionSpec of one parameter: first rule fully matching `name`, fitted to `shape`."""
  for pattern, spec in rules:
    # Any prefix is allowed (a decoupled pair nests params under selector/ranker).
    if re.fullmatch(rf"(?:.*/)?(?:{pattern})", name):
      return fit_spec(spec, shape, axis_sizes, name)
  key = ("no rule", name)
  if key not in _logged:
    _logged.add(key)
    _log.warning("sharding: no partition rule matches %r; replicating it", name)
  return P()


def param_specs(params_or_shapes, axis_sizes: Mapping[str, int], rules=DEFAULT_RULES):
  """Pytree of PartitionSpecs for params (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(path_name(path), x.shape, axis_sizes, rules), params_or_shapes)


def _axis_sizes(mesh) -> dict[str, int]:
  return dict(mesh.shape)


def param_shardings(params_or_shapes, mesh, rules=DEFAULT_RULES):
  """Pytree of NamedShardings (same structure as the params)."""
  sizes = _axis_sizes(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_name(path), x.shape, sizes, rules)),
      params_or_shapes)


def _is_sharding(x) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def opt_state_shardings(opt_state_shapes, param_shardings_tree, mesh, params_shapes=None):
  """Shardings for an optimizer state (arrays or `jax.eval_shape(optimizer.init, params)`).

  A leaf whose key path ends with a parameter's path (Adam's mu/nu, ...) gets that
  parameter's sharding (fitted to the leaf's shape; with `params_shapes`, only if
  the shapes are equal). Failing that, with `params_shapes`, a leaf shaped like
  parameters that all share one sharding gets it. Everything else (step counts,
  scalars, factored statistics) is replicated.
  """
  sizes = _axis_sizes(mesh)
  by_path, shape_of = {}, {}
  for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings_tree,
                                                       is_leaf=_is_sharding)[0]:
    by_path[_key_names(path)] = sh.spec
  if params_shapes is not None:
    for path, x in jax.tree_util.tree_flatten_with_path(params_shapes)[0]:
      shape_of[_key_names(path)] = tuple(x.shape)
  by_shape: dict[tuple, set] = {}
  for names, shape in shape_of.items():
    by_shape.setdefault(shape, set()).add(by_path.get(names, P()))

  def one(path, x):
    shape = tuple(x.shape)
    if not shape:
      return replicated(mesh)
    names = _key_names(path)
    for start in range(len(names)):
      suffix = names[start:]
      if suffix in by_path and (not shape_of or shape_of.get(suffix) == shape):
        return NamedSharding(mesh, fit_spec(by_path[suffix], shape, sizes, "/".join(names)))
    specs = by_shape.get(shape, set())
    if len(specs) == 1:
      return NamedSharding(mesh, next(iter(specs)))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, opt_state_shapes)


# ----------------------------------------------------------------------------
# Batches and KV caches.


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis over ("data", "fsdp"), other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh) -> int:
  """How many ways the batch is split (data * fsdp): batch sizes must be multiples."""
  return math.prod(_axis_sizes(mesh)[a] for a in BATCH_AXES)


def _cache_spec(ndim: int, batch_dim: int, heads_dim: int) -> P:
  entries = [None] * ndim
  entries[batch_dim] = BATCH_AXES
  entries[heads_dim] = "tensor"
  return P(*entries)


def cache_shardings(cache, mesh):
  """Shardings of a PrefixCache or DecodeCache of llama.py or qwen3_5.py (arrays or shapes).

  Batch over ("data", "fsdp"), kv heads over "tensor" when divisible; a Qwen3.5's
  DeltaNet conv window over its channels and recurrent state over its value heads
  (as the conv and projections split them). Returns the same NamedTuple type holding
  NamedShardings.
  """
  sizes = _axis_sizes(mesh)

  def put(name, x, spec):
    return NamedSharding(mesh, fit_spec(spec, x.shape, sizes, name))

  if isinstance(cache, (llama.PrefixCache, qwen3_5.PrefixCache)):
    kv = _cache_spec(5, 1, 3)  # k/v [L, B, P, K, D], mask [B, P], length [B]
    out = dict(k=put("prefix/k", cache.k, kv), v=put("prefix/v", cache.v, kv),
               mask=put("prefix/mask", cache.mask, P(BATCH_AXES)),
               length=put("prefix/length", cache.length, P(BATCH_AXES)))
    if isinstance(cache, qwen3_5.PrefixCache):  # conv [La, B, Kc-1, Cd]; state [La, B, Hv, ..]
      out.update(conv=put("prefix/conv", cache.conv, _cache_spec(4, 1, 3)),
                 state=put("prefix/state", cache.state, _cache_spec(5, 1, 2)))
    return type(cache)(**out)
  if isinstance(cache, (llama.DecodeCache, qwen3_5.DecodeCache)):
    kv = _cache_spec(6, 1, 4)  # k/v [L, B, G, S, K, D]
    out = dict(k=put("decode/k", cache.k, kv), v=put("decode/v", cache.v, kv))
    # Qwen3.5's DeltaNet layers: conv [La, B, G, Kc-1, Cd]; state [La, B, G, Hv, ..].
    if isinstance(cache, qwen3_5.DecodeCache):
      out.update(conv=put("decode/conv", cache.conv, _cache_spec(5, 1, 4)),
                 state=put("decode/state", cache.state, _cache_spec(6, 1, 3)))
    return type(cache)(**out)
  raise TypeError(f"cache_shardings expects a PrefixCache or DecodeCache, got {type(cache)}")


def process_batch_slice(global_batch: int) -> slice:
  """The rows of a global batch this process feeds (contiguous, process-major).

  Every process computes the same global example indices (data.arrays.batch_indices
  is a pure function of the step) and loads only `idx[process_batch_slice(B)]`.
  """
  n, i = jax.process_count(), jax.process_index()
  if global_batch % n:
    raise MeshError(f"batch size {global_batch} is not divisible by the {n} processes")
  per = global_batch // n
  return slice(i * per, (i + 1) * per)


def shard_batch(batch, mesh):
  """Host-local numpy batch (dict/pytree, leading axis = batch) -> global sharded arrays.

  One process: `device_put` with `batch_sharding` (the local batch is the global
  batch). Several: each process passes its own rows (see `process_batch_slice`)
  and `jax.make_array_from_process_local_data` assembles the global batch, whose
  size is the local size times the number of processes.
  """
  sharding = batch_sharding(mesh)
  shards = batch_shards(mesh)
  multi = jax.process_count() > 1

  def one(x):
    x = np.asarray(x)
    global_rows = x.shape[0] * (jax.process_count() if multi else 1)
    if global_rows % shards:
      raise MeshError(f"global batch size {global_rows} is not divisible by data*fsdp="
                      f"{shards} of config.mesh (mesh {dict(mesh.shape)})")
    if multi:
      return jax.make_array_from_process_local_data(sharding, x)
    return jax.device_put(x, sharding)

  return jax.tree.map(one, batch)


# ----------------------------------------------------------------------------
# Parameters and train state.


def init_sharded_params(cfg: llama.ModelConfig, key, mesh, rules=DEFAULT_RULES):
  """`llama.init_params(cfg, key)` created directly in its sharded layout.

  With the (default) partitionable threefry PRNG the values equal the unsharded
  init's, whatever the mesh.
  """
  return _init_fn(cfg, mesh, rules)(key)


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: llama.ModelConfig, mesh, rules):
  """One jitted init per (config, mesh, rules): a fresh lambda per call would compile the
  init again on every run in the same process (a comparison, the tests)."""
  shardings = param_shardings(decoder(cfg).param_shapes(cfg), mesh, rules)
  return jax.jit(functools.partial(decoder(cfg).init_params, cfg), out_shardings=shardings)


def init_opt_state(optimizer, params, mesh, rules=DEFAULT_RULES):
  """`optimizer.init(params)` created directly with `opt_state_shardings`."""
  p_sh = param_shardings(params, mesh, rules)
  shapes = jax.eval_shape(optimizer.init, params)
  o_sh = opt_state_shardings(shapes, p_sh, mesh, params_shapes=params)
  return jax.jit(optimizer.init, out_shardings=o_sh)(params)


def _put(x, sharding: NamedSharding):
  """device_put that also works when `sharding` spans other processes' devices.

  Each process must hold the same (whole) value; only its own shards are copied.
  """
  if sharding.is_fully_addressable or not hasattr(x, "shape"):
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x[idx]))


def put_tree(tree, shardings):
  return jax.tree.map(_put, tree, shardings)


def shard_params(params, mesh, rules=DEFAULT_RULES):
  """Moves existing params (e.g. restored, or converted from Hugging Face) to the mesh."""
  return put_tree(params, param_shardings(params, mesh, rules))


def train_state_shardings(state, mesh, rules=DEFAULT_RULES):
  """Shardings of a steps.TrainState(params, opt_state, step), as the same NamedTuple.

  A decoupled pair (params and opt_state both {role: ...}) is matched role by role:
  the optimizer paths (`selector/0/mu/layers/...`) would otherwise not end with the
  parameter paths (`selector/layers/...`) and fall back to matching by shape.
  """
  p_sh = param_shardings(state.params, mesh, rules)
  roles = (isinstance(state.opt_state, dict) and isinstance(state.params, dict)
           and set(state.opt_state) == set(state.params))
  if roles:
    o_sh = {r: opt_state_shardings(state.opt_state[r], p_sh[r], mesh,
                                   params_shapes=state.params[r]) for r in state.params}
  else:
    o_sh = opt_state_shardings(state.opt_state, p_sh, mesh, params_shapes=state.params)
  return state._replace(params=p_sh, opt_state=o_sh, step=replicated(mesh))


def shard_train_state(state, mesh, rules=DEFAULT_RULES):
  """A steps.TrainState moved onto the mesh: params by the rules, Adam moments alike."""
  return put_tree(state, train_state_shardings(state, mesh, rules))


def pin_state_shardings(step_fn, state_shardings, *, static_argnames: Sequence[str]):
  """A train step `(state, ...) -> (state, metrics)` whose new state keeps `state_shardings`.

  The steps need no sharding code: XLA propagates the inputs' shardings. But it is
  free to hand the *new* state back in another layout (on a data x fsdp x tensor
  mesh it returns the replicated norms split over fsdp), which would recompile the
  next step and checkpoint another layout. Pinning the output avoids both; metrics
  stay unconstrained. `step_fn` may itself be jitted (steps.rl_step): it is inlined.
  The state argument is donated, as in train.py.
  """
  return jax.jit(step_fn, static_argnames=tuple(static_argnames), donate_argnums=0,
                 out_shardings=(state_shardings, None))


def gather_to_host(tree):
  """Numpy copy of a pytree of (possibly multi-host) arrays, the same on every process."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def describe(params, mesh=None) -> str:
  """One line per parameter: path, shape, PartitionSpec (for the start-up log)."""
  lines = []
  if mesh is not None:
    lines.append("mesh " + " ".join(f"{a}={n}" for a, n in mesh.shape.items())
                 + f" over {mesh.size} devices")
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    lines.append(f"  {path_name(path):24s} {str(tuple(x.shape)):22s} {spec}")
  return "\n".join(lines)

