"""One call from a Hugging Face model directory to placed JAX params: `load`.

`load` is `preset` plus `restore`: the family's import rules and target tree
come from `config.json`, each leaf is placed by `sharding`, and each host reads
only what its own shards need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from etils import epath

from orbax_surgery.errors import RuleError
from orbax_surgery.huggingface.presets import LayerLayout, preset
from orbax_surgery.keys import PyTree, flatten, nest
from orbax_surgery.read.materialize import DEFAULT_MAX_INFLIGHT_BYTES
from orbax_surgery.read.restore import restore
from orbax_surgery.rules.rule import Rule

ShardingFor = Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding | None]


def load(
    model_dir: epath.PathLike,
    *,
    layers: LayerLayout = 'unrolled',
    to: Literal['flax', 'maxtext'] = 'flax',
    dtype: Any = None,
    sharding: jax.sharding.Sharding | ShardingFor | None = None,
    rules: Sequence[Rule] = (),
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
) -> PyTree:
    """The params of the Hugging Face model at `model_dir` (local or a URL), in one call.

    Args:
        model_dir: A directory with `config.json` and safetensors (or PyTorch) weights.
        layers: 'unrolled' (`layers_{i}`) or 'stacked' (scanned) layers.
        to: 'flax' (the canonical Flax layout) or 'maxtext' (MaxText's tree).
        dtype: The params' dtype; the config's by default.
        sharding: Where each leaf goes: one `Sharding` for all, or a function of
            the leaf's path ('layers/mlp/up_proj/kernel') and `ShapeDtypeStruct`
            giving a `Sharding` (or None: the default device). None puts every
            leaf on the default device.
        rules: Your own rules, applied after the preset's.
        max_inflight_bytes: The read budget per host.

    Raises:
        RuleError: an unknown `model_type`, or a sharding that does not divide a leaf
            (the message names the leaf, its shape and the sharding).

    Example:
        >>> import tempfile, transformers
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32,
        ...     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...     num_key_value_heads=2)
        >>> hf_dir = tempfile.mkdtemp()
        >>> transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
        >>> params = load(hf_dir, layers='stacked')
        >>> params['layers']['self_attn']['k_proj']['kernel'].shape
        (2, 32, 16)
    """
    found = preset(model_dir, layers=layers, to=to, dtype=dtype)
    target = _placed(found.target, sharding)
    return restore(
        model_dir,
        target,
        [*found.import_rules, *rules],
        max_inflight_bytes=max_inflight_bytes,
    )


def _placed(target: PyTree, sharding: jax.sharding.Sharding | ShardingFor | None) -> PyTree:
    if sharding is None:
        return target
    flat, _ = flatten(target)
    placed = {}
    for path, leaf in flat.items():
        chosen = sharding if isinstance(sharding, jax.sharding.Sharding) else sharding(path, leaf)
        if chosen is not None:
            try:
                chosen.shard_shape(leaf.shape)
            except ValueError as e:
                raise RuleError(
                    f'sharding {getattr(chosen, "spec", chosen)} does not divide {path!r} '
                    f'of shape {leaf.shape}: {e}. Pass a function of (path, leaf) to '
                    'choose a sharding per leaf.'
                ) from None
        placed[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=chosen)
    return nest(placed)
