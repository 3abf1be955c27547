"""Hugging Face Qwen2.5-VL directory <-> our parameter tree.

One declarative table, ``NAME_MAP``, says which HF tensor each leaf of our tree comes from
and how it is transformed; loading and export both walk it, so the two directions cannot
drift apart. An entry is ``(our path, HF name pattern, transform, stacked axis)``:

* HF name patterns use ``{visual}`` / ``{text}`` for the module prefixes, which differ by
  checkpoint layout (``LAYOUTS``): transformers 5 state dicts use ``model.visual.`` and
  ``model.language_model.``; hub checkpoints written by transformers 4.4x (and by 5.x's own
  ``save_pretrained``) use ``visual.`` and ``model.``. ``lm_head.weight`` is the same in both.
  ``{i}`` is the layer index of a stacked entry.
* transforms (``TRANSFORMS``), each a pair ``(hf -> ours, ours -> hf)``:
  ``copy``; ``linear``: torch ``Linear.weight`` is ``[out, in]``, our kernel is
  ``[in, out] = weight.T``; ``conv3d``: the patch embedding ``Conv3d`` weight
  ``[Dv, C, T, P, P]`` with kernel = stride is a matmul over flattened patches
  (flattened in the same C, T, P, P order), so ``kernel = weight.reshape(Dv, -1).T``.
* stacked entries (``"vision"``: one per ViT block, ``"text"``: one per decoder layer) are
  stacked on a new leading axis so the model can ``lax.scan`` over layers.
* with ``tie_word_embeddings`` there is no ``lm_head`` leaf: the head is the embedding.

Memory: ``load_hf_params`` preallocates every (stacked) leaf once and reads the checkpoint
one tensor at a time into it, so peak host memory is the parameters in the requested dtype
plus one tensor as stored on disk (about 1x the model; never a second full copy).
``save_hf`` streams in the other direction: one tensor (one layer's slice) at a time.
Only safetensors is read; pickled ``pytorch_model.bin`` checkpoints are refused. Directories
may be local or in cloud storage (``ilvr_jax.storage``) in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from ilvr_jax import storage
from ilvr_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from ilvr_jax.jsonfile import read_json, write_json
from ilvr_jax.model.config import ModelConfig

Path = tuple[str, ...]

LAYOUTS: dict[str, dict[str, str]] = {
    "transformers5": {"visual": "model.visual.", "text": "model.language_model."},
    "legacy": {"visual": "visual.", "text": "model."},
}
# The hub's names: transformers 4.5x reads only these (5.x reads both).
DEFAULT_EXPORT_LAYOUT = "legacy"

# Buffers some older checkpoints carry that are recomputed from the config, not parameters.
_IGNORED_TENSORS = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One leaf of our tree and the HF tensor(s) it corresponds to."""

    path: Path
    hf: str
    transform: str  # key of TRANSFORMS
    stack: str | None = None  # None, "vision" (ViT blocks) or "text" (decoder layers)


def _block(path: str, hf: str, transform: str, stack: str) -> Entry:
    return Entry(tuple(path.split("/")), hf, transform, stack)


def _single(path: str, hf: str, transform: str) -> Entry:
    return Entry(tuple(path.split("/")), hf, transform, None)


_VB = "visual/blocks/"
_VH = "{visual}blocks.{i}."
_TL = "text/layers/"
_TH = "{text}layers.{i}."

NAME_MAP: tuple[Entry, ...] = (
    # ---------------------------------------------------------------- vision tower
    _single("visual/patch_embed/kernel", "{visual}patch_embed.proj.weight", "conv3d"),
    _block(_VB + "norm1/scale", _VH + "norm1.weight", "copy", "vision"),
    _block(_VB + "norm2/scale", _VH + "norm2.weight", "copy", "vision"),
    _block(_VB + "attn/qkv/kernel", _VH + "attn.qkv.weight", "linear", "vision"),
    _block(_VB + "attn/qkv/bias", _VH + "attn.qkv.bias", "copy", "vision"),
    _block(_VB + "attn/proj/kernel", _VH + "attn.proj.weight", "linear", "vision"),
    _block(_VB + "attn/proj/bias", _VH + "attn.proj.bias", "copy", "vision"),
    _block(_VB + "mlp/gate_proj/kernel", _VH + "mlp.gate_proj.weight", "linear", "vision"),
    _block(_VB + "mlp/gate_proj/bias", _VH + "mlp.gate_proj.bias", "copy", "vision"),
    _block(_VB + "mlp/up_proj/kernel", _VH + "mlp.up_proj.weight", "linear", "vision"),
    _block(_VB + "mlp/up_proj/bias", _VH + "mlp.up_proj.bias", "copy", "vision"),
    _block(_VB + "mlp/down_proj/kernel", _VH + "mlp.down_proj.weight", "linear", "vision"),
    _block(_VB + "mlp/down_proj/bias", _VH + "mlp.down_proj.bias", "copy", "vision"),
    _single("visual/merger/ln_q/scale", "{visual}merger.ln_q.weight", "copy"),
    _single("visual/merger/fc1/kernel", "{visual}merger.mlp.0.weight", "linear"),
    _single("visual/merger/fc1/bias", "{visual}merger.mlp.0.bias", "copy"),
    _single("visual/merger/fc2/kernel", "{visual}merger.mlp.2.weight", "linear"),
    _single("visual/merger/fc2/bias", "{visual}merger.mlp.2.bias", "copy"),
    # ---------------------------------------------------------------- language model
    _single("text/embed_tokens/embedding", "{text}embed_tokens.weight", "copy"),
    _block(_TL + "input_layernorm/scale", _TH + "input_layernorm.weight", "copy", "text"),
    _block(_TL + "self_attn/q_proj/kernel", _TH + "self_attn.q_proj.weight", "linear", "text"),
    _block(_TL + "self_attn/q_proj/bias", _TH + "self_attn.q_proj.bias", "copy", "text"),
    _block(_TL + "self_attn/k_proj/kernel", _TH + "self_attn.k_proj.weight", "linear", "text"),
    _block(_TL + "self_attn/k_proj/bias", _TH + "self_attn.k_proj.bias", "copy", "text"),
    _block(_TL + "self_attn/v_proj/kernel", _TH + "self_attn.v_proj.weight", "linear", "text"),
    _block(_TL + "self_attn/v_proj/bias", _TH + "self_attn.v_proj.bias", "copy", "text"),
    _block(_TL + "self_attn/o_proj/kernel", _TH + "self_attn.o_proj.weight", "linear", "text"),
    _block(_TL + "post_attention_layernorm/scale", _TH + "post_attention_layernorm.weight", "copy", "text"),
    _block(_TL + "mlp/gate_proj/kernel", _TH + "mlp.gate_proj.weight", "linear", "text"),
    _block(_TL + "mlp/up_proj/kernel", _TH + "mlp.up_proj.weight", "linear", "text"),
    _block(_TL + "mlp/down_proj/kernel", _TH + "mlp.down_proj.weight", "linear", "text"),
    _single("text/norm/scale", "{text}norm.weight", "copy"),
    _single("lm_head/kernel", "lm_head.weight", "linear"),  # only when the head is untied
)


def _conv3d_to_hf(x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    return x.T.reshape(hf_shape)


# (hf tensor -> our per-layer array, (our per-layer array, hf shape) -> hf tensor).
# All are views (transposes/reshapes); the copy happens once, on assignment or write.
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]] = {
    "copy": (lambda x: x, lambda x, _: x),
    "linear": (lambda x: x.T, lambda x, _: x.T),
    "conv3d": (lambda x: x.reshape(x.shape[0], -1).T, _conv3d_to_hf),
}


# --------------------------------------------------------------------------- shapes
def _layer_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Our per-layer shape of every leaf (without the stacked axis)."""
    v, t = cfg.vision, cfg.text
    dv, iv, d, i, vocab = v.hidden_size, v.intermediate_size, t.hidden_size, t.intermediate_size, t.vocab_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    merged = dv * v.merge_unit
    s = {
        "visual/patch_embed/kernel": (v.patch_dim, dv),
        _VB + "norm1/scale": (dv,),
        _VB + "norm2/scale": (dv,),
        _VB + "attn/qkv/kernel": (dv, 3 * dv),
        _VB + "attn/qkv/bias": (3 * dv,),
        _VB + "attn/proj/kernel": (dv, dv),
        _VB + "attn/proj/bias": (dv,),
        _VB + "mlp/gate_proj/kernel": (dv, iv),
        _VB + "mlp/gate_proj/bias": (iv,),
        _VB + "mlp/up_proj/kernel": (dv, iv),
        _VB + "mlp/up_proj/bias": (iv,),
        _VB + "mlp/down_proj/kernel": (iv, dv),
        _VB + "mlp/down_proj/bias": (dv,),
        "visual/merger/ln_q/scale": (dv,),
        "visual/merger/fc1/kernel": (merged, merged),
        "visual/merger/fc1/bias": (merged,),
        "visual/merger/fc2/kernel": (merged, v.out_hidden_size),
        "visual/merger/fc2/bias": (v.out_hidden_size,),
        "text/embed_tokens/embedding": (vocab, d),
        _TL + "input_layernorm/scale": (d,),
        _TL + "self_attn/q_proj/kernel": (d, q),
        _TL + "self_attn/q_proj/bias": (q,),
        _TL + "self_attn/k_proj/kernel": (d, kv),
        _TL + "self_attn/k_proj/bias": (kv,),
        _TL + "self_attn/v_proj/kernel": (d, kv),
        _TL + "self_attn/v_proj/bias": (kv,),
        _TL + "self_attn/o_proj/kernel": (q, d),
        _TL + "post_attention_layernorm/scale": (d,),
        _TL + "mlp/gate_proj/kernel": (d, i),
        _TL + "mlp/up_proj/kernel": (d, i),
        _TL + "mlp/down_proj/kernel": (i, d),
        "text/norm/scale": (d,),
        "lm_head/kernel": (d, vocab),
    }
    return {tuple(k.split("/")): shape for k, shape in s.items()}


def _num_layers(entry: Entry, cfg: ModelConfig) -> int | None:
    return {None: None, "vision": cfg.vision.depth, "text": cfg.text.num_hidden_layers}[entry.stack]


def entries(cfg: ModelConfig) -> tuple[Entry, ...]:
    """The entries of ``NAME_MAP`` that exist for ``cfg`` (no ``lm_head`` when tied)."""
    return tuple(e for e in NAME_MAP if not (e.path == ("lm_head", "kernel") and cfg.text.tie_word_embeddings))


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Full shape of every leaf of our parameter tree (stacked axis first where stacked)."""
    layer = _layer_shapes(cfg)
    out = {}
    for e in entries(cfg):
        n = _num_layers(e, cfg)
        out[e.path] = layer[e.path] if n is None else (n, *layer[e.path])
    return out


def _hf_shape(entry: Entry, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of one HF tensor of ``entry`` (one layer's tensor for stacked entries)."""
    ours = _layer_shapes(cfg)[entry.path]
    if entry.transform == "linear":
        return tuple(reversed(ours))
    if entry.transform == "conv3d":
        v = cfg.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return ours


def hf_names(cfg: ModelConfig, layout: str = DEFAULT_EXPORT_LAYOUT) -> Iterator[tuple[str, Entry, int | None]]:
    """Every HF tensor name for ``cfg`` in ``layout`` with its entry and layer index.

    Ordered as an HF state dict is: vision tower, then the language model layer by layer.
    """
    prefixes = LAYOUTS[layout]
    es = entries(cfg)
    groups: list[tuple[str | None, list[Entry]]] = []
    for e in es:
        if groups and groups[-1][0] == e.stack:
            groups[-1][1].append(e)
        else:
            groups.append((e.stack, [e]))
    for stack, group in groups:
        n = _num_layers(group[0], cfg)
        for i in [None] if n is None else range(n):
            for e in group:
                name = e.hf.format(i=i, **prefixes)
                yield name, e, i


# --------------------------------------------------------------------------- tree helpers
def _set(tree: dict, path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: Path) -> Any:
    node = tree
    for k in path:
        if not isinstance(node, dict) or k not in node:
            raise KeyError(f"parameter tree has no leaf {'/'.join(path)}")
        node = node[k]
    return node


def _leaf_paths(tree: Any, prefix: Path = ()) -> Iterator[Path]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, str(k)))
    else:
        yield prefix


def to_numpy_dtype(dtype: Any) -> np.dtype:
    """``np.dtype`` of a NumPy/JAX dtype or a name (``"bfloat16"``, ``"float32"``, ...)."""
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Raises ``ValueError`` unless ``params`` has exactly the leaves and shapes ``cfg`` implies."""
    want = param_shapes(cfg)
    have = set(_leaf_paths(params))
    missing = sorted("/".join(p) for p in want if p not in have)
    extra = sorted("/".join(p) for p in have if p not in want)
    if missing or extra:
        raise ValueError(f"parameter tree does not match the config: missing {missing}, unexpected {extra}")
    for p, shape in want.items():
        got = tuple(np.shape(_get(params, p)))
        if got != shape:
            raise ValueError(f"parameter {'/'.join(p)} has shape {got}, the config implies {shape}")


# --------------------------------------------------------------------------- reading
def _open_checkpoint(hf_dir: str) -> dict[str, SafetensorsFile]:
    """Tensor name -> the safetensors file holding it (single file or index + shards)."""
    index_path = storage.join(hf_dir, INDEX_FILE)
    single_path = storage.join(hf_dir, SINGLE_FILE)
    if storage.isfile(index_path):
        try:
            weight_map = json.loads(storage.read_text(index_path))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a safetensors index (no weight_map): {e}") from e
        files: dict[str, SafetensorsFile] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = storage.join(hf_dir, shard)
            if not storage.isfile(shard_path):
                raise FileNotFoundError(f"{shard_path}: shard listed in {index_path} does not exist")
            files[shard] = SafetensorsFile(shard_path)
        where: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if name not in files[shard]:
                raise ValueError(f"{files[shard].path}: tensor {name!r} listed in {index_path} is not in this shard")
            where[name] = files[shard]
        for shard, sf in files.items():
            for name in sf.keys():
                if name not in where:
                    raise ValueError(f"{sf.path}: tensor {name!r} is not listed in {index_path}")
        return where
    if storage.isfile(single_path):
        sf = SafetensorsFile(single_path)
        return {name: sf for name in sf.keys()}
    pickled = [n for n in sorted(storage.listdir(hf_dir)) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickled:
        raise ValueError(
            f"{hf_dir}: only pickled weights ({', '.join(pickled)}); safetensors is required "
            f"({SINGLE_FILE} or {INDEX_FILE} + shards). Pickles are never loaded: convert them with "
            "transformers' save_pretrained(safe_serialization=True) first."
        )
    raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def detect_layout(names: list[str], where: str = "checkpoint") -> str:
    """``"transformers5"`` or ``"legacy"`` from the tensor names (see ``LAYOUTS``)."""
    t5 = any(n.startswith(("model.visual.", "model.language_model.")) for n in names)
    legacy = any(n.startswith("visual.") or re.match(r"model\.(layers|embed_tokens|norm)\.", n) for n in names)
    if t5 and legacy:
        raise ValueError(f"{where}: mixes transformers-5 (model.language_model.*) and 4.4x (model.layers.*) names")
    if not (t5 or legacy):
        raise ValueError(f"{where}: no Qwen2.5-VL tensor names (expected visual.* / model.* weights)")
    return "transformers5" if t5 else "legacy"


def load_hf_params(hf_dir: str, dtype: Any = np.float32) -> tuple[ModelConfig, dict]:
    """Reads an HF Qwen2.5-VL directory into ``(ModelConfig, params)`` with NumPy leaves.

    Accepts both name layouts (see ``LAYOUTS``), a single ``model.safetensors`` or an index
    with shards, any float dtype on disk (bf16 included); leaves are cast to ``dtype``.
    Peak host memory is the returned parameters plus one tensor as stored on disk.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and tensor for: a missing
    directory, config or shard; a config that is not Qwen2.5-VL; pickled-only weights; a
    tensor that is missing, unexpected or of the wrong shape for the config.
    """
    hf_dir = os.fspath(hf_dir)
    if not storage.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: not a directory")
    cfg = read_model_config(hf_dir)
    dt = to_numpy_dtype(dtype)
    where = _open_checkpoint(hf_dir)
    layout = detect_layout(list(where), hf_dir)

    expected = {name: (e, i) for name, e, i in hf_names(cfg, layout)}
    missing = [n for n in expected if n not in where]
    if missing:
        raise ValueError(
            f"{hf_dir}: {len(missing)} tensor(s) missing for the config in config.json, e.g. "
            f"{missing[:5]} ({layout} layout)"
        )
    tied_head = cfg.text.tie_word_embeddings
    unexpected = [
        (n, sf.path) for n, sf in where.items()
        if n not in expected and not _IGNORED_TENSORS.search(n) and not (tied_head and n == "lm_head.weight")
    ]
    if unexpected:
        raise ValueError(
            f"{unexpected[0][1]}: {len(unexpected)} unexpected tensor(s) for a Qwen2.5-VL with this "
            f"config, e.g. {[n for n, _ in unexpected[:5]]}"
        )

    params: dict = {}
    for path, shape in param_shapes(cfg).items():
        _set(params, path, np.empty(shape, dt))
    for name, (e, i) in expected.items():
        sf = where[name]
        want = _hf_shape(e, cfg)
        if sf.shape(name) != want:
            raise ValueError(
                f"{sf.path}: tensor {name!r} has shape {sf.shape(name)}, config.json implies {want}"
            )
        if not np.issubdtype(sf.dtype(name), np.floating) and sf.dtype(name) != np.dtype(ml_dtypes.bfloat16):
            raise ValueError(f"{sf.path}: tensor {name!r} has non-float dtype {sf.dtype(name)}")
        value = TRANSFORMS[e.transform][0](sf.read(name))
        dest = _get(params, e.path)
        if i is None:
            dest[...] = value
        else:
            dest[i] = value
        del value
    return cfg, params


# --------------------------------------------------------------------------- writing
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
_SHARD_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def _dtype_name(dt: np.dtype) -> str:
    return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else dt.name


def hf_tensors(
    params: dict, cfg: ModelConfig, dtype: Any = None, layout: str = DEFAULT_EXPORT_LAYOUT
) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """``(hf name, shape, dtype, produce)`` for every HF tensor of ``params``.

    ``produce()`` materialises one tensor (one layer's slice of a stacked leaf, transformed
    back to HF's layout, cast to ``dtype`` or kept in the leaf's dtype when ``None``).
    """
    out = []
    for name, e, i in hf_names(cfg, layout):
        leaf = _get(params, e.path)
        dt = to_numpy_dtype(dtype if dtype is not None else leaf.dtype)
        hf_shape = _hf_shape(e, cfg)

        def produce(leaf=leaf, i=i, e=e, hf_shape=hf_shape, dt=dt):
            x = np.asarray(leaf if i is None else leaf[i])
            return np.ascontiguousarray(TRANSFORMS[e.transform][1](x, hf_shape), dtype=dt)

        out.append((name, hf_shape, dt, produce))
    return out


def copy_tokenizer_files(src_dir: str, out_dir: str, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copies the tokenizer / processor / generation files (``names``) present in ``src_dir``;
    returns the names copied."""
    copied = []
    for name in names:
        src = storage.join(src_dir, name)
        dst = storage.join(out_dir, name)
        if storage.isfile(src) and storage.abspath(src) != storage.abspath(dst):
            storage.copy_file(src, dst)
            copied.append(name)
    return copied


def read_model_config(hf_dir: str) -> ModelConfig:
    """``ModelConfig.from_hf`` of a model directory's config.json, local or in cloud storage
    (read through ``ilvr_jax.storage``, with the same one-line errors)."""
    if storage.is_local(hf_dir):
        return ModelConfig.from_hf(hf_dir)
    cfg_file = storage.join(hf_dir, "config.json")
    if not storage.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file}: no config.json (not an HF model directory)")
    try:
        raw = read_json(cfg_file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if raw.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 'qwen2_5_vl' "
                         "(this is not a Qwen2.5-VL checkpoint)")
    return ModelConfig.from_hf(raw)


def save_hf(
    params: dict,
    cfg: ModelConfig,
    out_dir: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 4 * 1024**3,
    tokenizer_dir: str | None = None,
    tokenizer: Any = None,
    layout: str = DEFAULT_EXPORT_LAYOUT,
    source_config: dict | None = None,
) -> list[str]:
    """Writes an HF Qwen2.5-VL directory that ``from_pretrained`` loads; returns the shard names.

    * ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` each (a
      tensor larger than that gets a shard of its own) and ``model.safetensors.index.json``,
      with the hub's (4.4x) names by default, which every transformers version reads
      (``layout="transformers5"`` for 5.x's state-dict names);
    * ``config.json`` in the hub's layout (``cfg.to_hub_dict``: read by transformers 4.5x and
      5.x; latent token ids and latent size included; the fields of ``source_config``, the
      config.json training started from, kept) with the stored dtype;
    * the tokenizer/processor files of ``tokenizer_dir`` (``TOKENIZER_FILES``), and
      ``tokenizer.save_pretrained(out_dir)`` when a tokenizer object is given (after the
      copy, so it wins); the tokenizer config is then rewritten in the hub's layout
      (``tokenizer_files.write_hub_tokenizer_config``) so that 4.5x reads it too.

    ``dtype=None`` keeps each leaf's dtype. Tensors are produced one at a time. Stale
    ``model*.safetensors`` files from an earlier export into ``out_dir`` are removed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {sorted(LAYOUTS)}")
    check_params(params, cfg)
    storage.makedirs(out_dir)
    tensors = hf_tensors(params, cfg, dtype, layout)

    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * t[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for shard_name, shard in zip(names, shards):
        total += write_safetensors(storage.join(out_dir, shard_name), shard, {"format": "pt"})
        weight_map.update({t[0]: shard_name for t in shard})
    write_json(
        storage.join(out_dir, INDEX_FILE),
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    for stale in storage.listdir(out_dir):
        if _SHARD_RE.match(stale) and stale not in names:
            storage.remove(storage.join(out_dir, stale))

    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    if tokenizer is not None:
        if storage.is_local(out_dir):
            tokenizer.save_pretrained(out_dir)
        else:   # transformers writes local files only
            with tempfile.TemporaryDirectory() as local:
                tokenizer.save_pretrained(local)
                storage.copy_tree(local, out_dir)
    from ilvr_jax.checkpoint.tokenizer_files import write_hub_tokenizer_config

    write_hub_tokenizer_config(out_dir)
    stored = {t[2] for t in tensors}
    hf_cfg = cfg.to_hub_dict(source_config, _dtype_name(stored.pop()) if len(stored) == 1 else None)
    write_json(storage.join(out_dir, "config.json"), hf_cfg)
    return names


def select_model_params(tree: dict, which: str = "student") -> dict:
    """The model parameters inside ``tree``: ``tree`` itself when it is a parameter tree,
    ``tree[which]`` when it is a training state holding ``"student"`` / ``"teacher"``."""
    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r}: expected 'student' or 'teacher'")
    if "text" in tree and "visual" in tree:
        if which == "teacher":
            raise ValueError("the tree is a single parameter tree, it holds no teacher")
        return tree
    if which in tree and isinstance(tree[which], dict):
        return select_model_params(tree[which], "student")
    if "params" in tree and isinstance(tree["params"], dict):
        return select_model_params(tree["params"], which)
    raise ValueError(f"no model parameters found (wanted {which!r}); top-level keys: {sorted(tree)}")


def export_params_to_hf(
    params_or_state: dict,
    cfg: ModelConfig,
    out_dir: str,
    tokenizer_dir: str | None = None,
    *,
    dtype: Any = None,
    which: str = "student",
    **save_kw: Any,
) -> list[str]:
    """``save_hf`` of the model parameters in a parameter tree or a training state
    (``which`` picks ``"student"`` or ``"teacher"``). What ``convert to-hf`` calls."""
    params = select_model_params(params_or_state, which)
    return save_hf(params, cfg, out_dir, dtype=dtype, tokenizer_dir=tokenizer_dir, **save_kw)
