#!/usr/bin/env python3
"""Run MaxText's own forward pass on an Orbax parameter checkpoint and save the logits.

This is a standalone script, NOT a pytest module. Run it with the interpreter of a
virtualenv that has MaxText 0.2.5 installed (e.g. /work/maxtext/venv/bin/python):

  maxtext_logits.py --model {llama2,llama3,llama3.1,mistral,gemma,gemma2,qwen2,qwen3,mixtral} \
      --params ORBAX_PATH --config-json HF_CONFIG_JSON --scan {true,false} \
      --ids IDS_JSON --out LOGITS.npy [--fp32-tied-logits] [--loader {linen,nnx}]
      [--override key=value ...] [--dump-tree]

Exit status is non-zero (with a list of missing / unexpected / wrongly shaped paths) when
the checkpoint's params tree is not exactly the tree MaxText builds for this config.

ORBAX_PATH may be any of:
  * the directory a MaxText converter was pointed at (it holds a step folder "0/"),
  * the step folder itself (".../0"),
  * MaxText's documented load_parameters_path form (".../0/items").
The checkpoint must have the structure MaxText's converters write: an Orbax v1
training checkpoint whose "items" checkpointable is a flax TrainState
(step, params, opt_state={}), with the weights at items/params/params/...
(i.e. TrainState.params == {"params": {"token_embedder": ..., "decoder": ...}}).

HF_CONFIG_JSON is the Hugging Face config.json of the model the params came from; the
MaxText config is built from MaxText's own base.yml + configs/models/<model>.yml with
override_model_config=True and the sizes taken from the HF config.

IDS_JSON holds a JSON list of token-id lists, all the same length (e.g. 2 x 12). The
forward pass uses positions 0..S-1, decoder segment ids all 1, dropout disabled, and
MODEL_MODE_TRAIN (full causal attention, no KV cache). The logits are written as a
float32 .npy array of shape (batch, seq, vocab); if MaxText's vocab is padded beyond
the HF vocab (e.g. gemma's 256128 vs 256000) only the first HF-vocab columns are kept.

Everything is computed in float32 (dtype, weight_dtype, matmul_precision=highest,
float32 qk product and softmax) EXCEPT one thing MaxText 0.2.5 hard-codes: for tied
embeddings (logits_via_embedding=True, i.e. gemma/gemma2) `attend_on_embedding` casts
the embedding table to bfloat16 before the logit matmul (bf16 rounding, ~2**-9 relative
per entry; measured max |diff| ~5e-3 on O(1) logits of a tiny model).
`--fp32-tied-logits` removes that cast (monkeypatch) so a converter can be checked to
fp32 tolerance; the default keeps MaxText's behaviour.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

# model choice -> MaxText model_name: selects configs/models/<name>.yml and model-specific code
MODEL_NAMES = {
    'llama2': 'llama2-7b',
    'llama3': 'llama3-8b',
    # interleaved-RoPE layout + llama3.1 rope scaling (MaxText LLaMARotaryEmbedding)
    'llama3.1': 'llama3.1-8b',
    'mistral': 'mistral-7b',
    'gemma': 'gemma-2b',
    'gemma2': 'gemma2-2b',
    'qwen2': 'qwen2.5-1.5b',
    'qwen3': 'qwen3-0.6b',
    'mixtral': 'mixtral-8x7b',
}
LLAMA_FAMILY = ('llama2', 'llama3', 'llama3.1', 'mistral')
# MaxText's MoE (mixtral) needs no special settings on CPU: its default dropless path
# (sparse_matmul=true, megablox=true, capacity_factor=-1) runs the megablox Pallas kernel in
# interpret mode off TPU, in the config's float32. `--override megablox=false` (jax ragged_dot)
# and `--override sparse_matmul=false` (dense: every expert on every token, combined with the
# top-k weights) give the same logits (measured within 1e-6 of each other on the test model).


def _str2bool(v: str) -> bool:
    if v.lower() in ('true', '1', 'yes'):
        return True
    if v.lower() in ('false', '0', 'no'):
        return False
    raise argparse.ArgumentTypeError(f'expected true/false, got {v!r}')


def _rope_theta(hf: dict, default: float) -> float:
    if 'rope_theta' in hf and hf['rope_theta'] is not None:
        return float(hf['rope_theta'])
    rp = hf.get('rope_parameters') or {}
    if isinstance(rp, dict):
        if 'rope_theta' in rp:
            return float(rp['rope_theta'])
        # gemma-style per-layer-type dicts
        for sub in rp.values():
            if isinstance(sub, dict) and 'rope_theta' in sub:
                return float(sub['rope_theta'])
    return default


def _rope_type(hf: dict) -> str:
    for key in ('rope_scaling', 'rope_parameters'):
        rp = hf.get(key)
        if isinstance(rp, dict):
            t = rp.get('rope_type') or rp.get('type')
            if t:
                return str(t)
    return 'default'


def maxtext_overrides_from_hf(model: str, hf: dict, scan: bool, batch: int, seq: int) -> dict:
    """MaxText 0.2.5 config keys that make configs/models/<model>.yml match the HF config."""
    heads = int(hf['num_attention_heads'])
    hidden = int(hf['hidden_size'])
    head_dim = int(hf.get('head_dim') or hidden // heads)
    n_layers = int(hf['num_hidden_layers'])
    ov = {
        'model_name': MODEL_NAMES[model],
        'override_model_config': True,
        'base_emb_dim': hidden,
        'base_num_query_heads': heads,
        'base_num_kv_heads': int(hf.get('num_key_value_heads') or heads),
        'head_dim': head_dim,
        'base_mlp_dim': int(hf['intermediate_size']),
        'base_num_decoder_layers': n_layers,
        'vocab_size': int(hf['vocab_size']),
        'normalization_layer_epsilon': float(hf.get('rms_norm_eps', 1e-6)),
        'rope_max_timescale': _rope_theta(hf, 10000.0),
        'scan_layers': scan,
        'param_scan_axis': 1,
        'dtype': 'float32',
        'weight_dtype': 'float32',
        'matmul_precision': 'highest',
        'float32_qk_product': True,
        'float32_logits': True,
        'logits_dot_in_fp32': True,
        'cast_logits_to_fp32': True,
        'attention': 'dot_product',
        'enable_dropout': False,
        'dropout_rate': 0.0,
        'per_device_batch_size': batch,
        'max_target_length': seq,
        'max_prefill_predict_length': seq,
        'hardware': 'cpu',
        'skip_jax_distributed_system': True,
        'enable_checkpointing': False,
        'async_checkpointing': False,
        'run_name': 'maxtext_logits',
    }
    rtype = _rope_type(hf)
    if model in ('qwen2', 'qwen3', 'mixtral') and rtype not in ('default', 'None'):
        print(
            f'WARNING: HF rope type {rtype!r} is not reproduced by MaxText '
            f'{MODEL_NAMES[model]!r} (default rotate-half RoPE without scaling).',
            file=sys.stderr,
        )
    if model in ('qwen2', 'qwen3', 'mixtral'):
        # Tied Qwen (e.g. qwen3-0.6b) takes its logits from the embedding, unscaled.
        ov['logits_via_embedding'] = bool(hf.get('tie_word_embeddings', False))
        ov['normalize_embedding_logits'] = False
        window = hf.get('sliding_window') if hf.get('use_sliding_window', True) else None
        if window:
            print(
                f'NOTE: MaxText {MODEL_NAMES[model]!r} applies no sliding window; HF '
                f'sliding_window={window} only matters for sequences longer than it.',
                file=sys.stderr,
            )
    if model in ('qwen2', 'qwen3'):
        ov['use_qk_norm'] = model == 'qwen3'
        ov['attention_bias'] = model == 'qwen2'
    elif model == 'mixtral':
        ov['num_experts'] = int(hf['num_local_experts'])
        ov['num_experts_per_tok'] = int(hf['num_experts_per_tok'])
        ov['base_moe_mlp_dim'] = int(hf['intermediate_size'])
    elif model in LLAMA_FAMILY:
        tied = bool(hf.get('tie_word_embeddings', False))
        ov['logits_via_embedding'] = tied
        if tied:
            # MaxText divides tied logits by sqrt(emb) unless this is off
            # (gemma bakes sqrt(emb) into its table)
            ov['normalize_embedding_logits'] = False
        if model == 'llama3.1':
            ov['rope_type'] = 'llama3.1'
            ov['rope_use_scale'] = rtype == 'llama3'
        elif rtype not in ('default', 'None'):
            print(
                f'WARNING: HF rope type {rtype!r} is not reproduced by MaxText '
                f'{MODEL_NAMES[model]!r} (default rotate-half RoPE without scaling); '
                'use --model llama3.1 for llama3-type scaling.',
                file=sys.stderr,
            )
        if model == 'mistral' and hf.get('sliding_window'):
            print(
                "NOTE: MaxText's MistralDecoderLayer applies no sliding window; HF sliding_window="
                f'{hf["sliding_window"]} only matters for sequences longer than it.',
                file=sys.stderr,
            )
    elif model == 'gemma':
        ov['logits_via_embedding'] = True
        if abs(float(hf.get('rms_norm_eps', 1e-6)) - 1e-6) > 0:
            print(
                'WARNING: MaxText gemma layer norms hard-code epsilon=1e-6 '
                '(only decoder_norm uses the config).',
                file=sys.stderr,
            )
    elif model == 'gemma2':
        if n_layers % 2:
            raise ValueError(
                'gemma2: MaxText pairs (local, global) HF layers; num_hidden_layers must be even'
            )
        ov['base_num_decoder_layers'] = n_layers // 2
        ov['logits_via_embedding'] = True
        ov['sliding_window_size'] = int(hf.get('sliding_window') or 4096)
        ov['attn_logits_soft_cap'] = float(hf.get('attn_logit_softcapping') or 0.0)
        ov['final_logits_soft_cap'] = float(hf.get('final_logit_softcapping') or 0.0)
        ov['use_post_attn_norm'] = True
        ov['use_post_ffw_norm'] = True
    else:
        raise ValueError(model)
    return ov


def resolve_load_parameters_path(path: str) -> str:
    """Returns MaxText's load_parameters_path form (<root>/<step>/items) for a converter output."""
    path = os.path.abspath(path.rstrip('/'))
    if os.path.basename(path) == 'items':
        return path
    if os.path.isdir(os.path.join(path, 'items')):
        return os.path.join(path, 'items')
    steps = sorted(
        int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))
    )
    if not steps:
        raise FileNotFoundError(f'no step folder (e.g. 0/) and no items/ under {path}')
    return os.path.join(path, str(steps[-1]), 'items')


def check_checkpoint_matches_model(load_parameters_path: str, abstract_params) -> None:
    """Fails unless the checkpoint's items/params/params tree has the model's paths and shapes.

    MaxText's loader tolerates some differences (it only logs unconsumed checkpoint weights), and
    model_creation_utils.from_pretrained even auto-transposes reversed 2-D shapes; a layout check
    must not, so compare the on-disk metadata first.
    """
    import jax
    from orbax.checkpoint import v1 as ocp

    root = (
        load_parameters_path[: -len('/items')]
        if load_parameters_path.endswith('/items')
        else load_parameters_path
    )
    stored = ocp.metadata(root, checkpointable_name='items').metadata

    def flat(tree):
        out = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out['/'.join(str(getattr(k, 'key', k)) for k in path)] = tuple(leaf.shape)
        return out

    if not isinstance(stored, dict) or 'params' not in stored:
        raise ValueError(
            f'checkpoint at {root} has no items/params tree; top-level keys: {list(stored)}'
        )
    have = {'params/' + k: v for k, v in flat(stored['params']).items()}
    want = {'params/' + k: v for k, v in flat(abstract_params).items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        lines = [f'checkpoint layout does not match MaxText model ({root}):']
        lines += [f'  missing {k} {want[k]}' for k in missing]
        lines += [f'  unexpected {k} {have[k]}' for k in extra]
        lines += [f'  shape {k}: checkpoint {have[k]} != model {want[k]}' for k in wrong]
        raise ValueError('\n'.join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument('--model', required=True, choices=sorted(MODEL_NAMES))
    p.add_argument(
        '--params', required=True, help='Orbax checkpoint written in MaxText converter layout'
    )
    p.add_argument('--config-json', required=True, help='Hugging Face config.json')
    p.add_argument(
        '--scan', required=True, type=_str2bool, help='scan_layers the checkpoint was written with'
    )
    p.add_argument('--ids', required=True, help='JSON file: list of equal-length token-id lists')
    p.add_argument('--out', required=True, help='output .npy (float32 logits, batch x seq x vocab)')
    p.add_argument(
        '--override', action='append', default=[], help='extra MaxText config override key=value'
    )
    p.add_argument(
        '--fp32-tied-logits',
        action='store_true',
        help="undo MaxText's bf16 cast of tied embeddings",
    )
    p.add_argument(
        '--dump-tree', action='store_true', help='print the loaded params tree (path, shape, dtype)'
    )
    p.add_argument(
        '--loader',
        choices=('linen', 'nnx'),
        default='linen',
        help='linen: Linen Transformer + checkpointing.load_params_from_path (strict; what '
        'load_parameters_path uses in training). nnx: model_creation_utils.from_pretrained '
        '(maxengine/SFT path) + NNX forward.',
    )
    args = p.parse_args(argv)

    # Only here, not at import: pytest --doctest-modules imports this file in the project's suite.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import numpy as np

    with open(args.config_json, encoding='utf-8') as f:
        hf = json.load(f)
    with open(args.ids, encoding='utf-8') as f:
        ids = np.asarray(json.load(f), dtype=np.int32)
    if ids.ndim != 2:
        raise ValueError(f'--ids must be a 2-D list, got shape {ids.shape}')
    batch, seq = ids.shape

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax.linen import partitioning as nn_partitioning

    jax.config.update('jax_default_matmul_precision', 'highest')

    from maxtext.common import checkpointing
    from maxtext.common.common_types import MODEL_MODE_TRAIN
    from maxtext.configs import pyconfig
    from maxtext.layers import quantizations
    from maxtext.models import models
    from maxtext.utils import max_utils, maxtext_utils

    if args.fp32_tied_logits:
        from maxtext.layers import embeddings as mt_embeddings
        from maxtext.layers import nnx_decoders as mt_nnx_decoders

        def _attend_fp32(query, embedding_table, attend_dtype, config, out_sharding=None):
            del attend_dtype, config, out_sharding
            return jnp.dot(
                query,
                jnp.asarray(embedding_table, jnp.float32).T,
                preferred_element_type=jnp.float32,
            )

        mt_embeddings.attend_on_embedding = _attend_fp32
        mt_nnx_decoders.attend_on_embedding = _attend_fp32

    overrides = maxtext_overrides_from_hf(args.model, hf, args.scan, batch, seq)
    overrides['load_parameters_path'] = resolve_load_parameters_path(args.params)
    tmp_out = tempfile.mkdtemp(
        prefix='maxtext_logits_'
    )  # MaxText wants a base_output_directory; nothing is written
    overrides['base_output_directory'] = tmp_out
    for kv in args.override:
        k, v = kv.split('=', 1)
        overrides[k] = v
    argv_cfg = [sys.argv[0], os.path.join(os.path.dirname(pyconfig.__file__), 'base.yml')]
    argv_cfg += [f'{k}={v}' for k, v in overrides.items()]
    config = pyconfig.initialize(argv_cfg)

    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    segment_ids = np.ones((batch, seq), dtype=np.int32)

    if args.loader == 'nnx':
        from maxtext.utils import model_creation_utils

        # strict layout check against the converter's abstract tree, then MaxText's NNX loader
        lin_mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(config), config.mesh_axes)
        lin_model = models.transformer_as_linen(
            config,
            lin_mesh,
            quant=quantizations.configure_quantization(config),
            model_mode=MODEL_MODE_TRAIN,
        )
        check_checkpoint_matches_model(
            overrides['load_parameters_path'],
            max_utils.unbox_logicallypartioned(maxtext_utils.get_abstract_param(lin_model, config)),
        )
        nnx_model, mesh = model_creation_utils.from_pretrained(config)
        if args.dump_tree:
            from flax import nnx

            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(nnx_model, nnx.Param)):
                print(
                    'nnx/' + '/'.join(str(getattr(k, 'key', k)) for k in path),
                    tuple(leaf.shape),
                    leaf.dtype,
                )
        with jax.set_mesh(mesh):
            logits = nnx_model(
                jnp.asarray(ids),
                jnp.asarray(positions),
                decoder_segment_ids=jnp.asarray(segment_ids),
                enable_dropout=False,
                model_mode=MODEL_MODE_TRAIN,
            )
    else:
        devices_array = maxtext_utils.create_device_mesh(config)
        mesh = jax.sharding.Mesh(devices_array, config.mesh_axes)
        quant = quantizations.configure_quantization(config)
        model = models.transformer_as_linen(config, mesh, quant=quant, model_mode=MODEL_MODE_TRAIN)

        rng = jax.random.PRNGKey(0)
        # Abstract params as MaxText's converter (to_maxtext.get_maxtext_model_info) builds them,
        # then MaxText's own strict params-only loader (the one behind load_parameters_path).
        abstract_boxed = maxtext_utils.get_abstract_param(model, config)
        shardings = nn.logical_to_mesh_sharding(
            nn.get_partition_spec(abstract_boxed), mesh, config.logical_axis_rules
        )
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            max_utils.unbox_logicallypartioned(abstract_boxed),
            shardings,
        )
        check_checkpoint_matches_model(overrides['load_parameters_path'], abstract)
        with jax.set_mesh(mesh), nn_partitioning.axis_rules(config.logical_axis_rules):
            params = checkpointing.load_params_from_path(
                config.load_parameters_path,
                abstract,
                config.checkpoint_storage_concurrent_gb,
                config.checkpoint_storage_use_ocdbt,
                config.checkpoint_storage_use_zarr3,
            )

        if args.dump_tree:
            for path, leaf in jax.tree_util.tree_leaves_with_path(params):
                print(
                    'params/' + '/'.join(str(getattr(k, 'key', k)) for k in path),
                    tuple(leaf.shape),
                    leaf.dtype,
                )

        with jax.set_mesh(mesh), nn_partitioning.axis_rules(config.logical_axis_rules):
            logits = model.apply(
                params,
                jnp.asarray(ids),
                jnp.asarray(positions),
                decoder_segment_ids=jnp.asarray(segment_ids),
                enable_dropout=False,
                model_mode=MODEL_MODE_TRAIN,
                rngs={'dropout': rng, 'aqt': rng, 'params': rng},
            )
    logits = np.asarray(jax.device_get(logits), dtype=np.float32)
    hf_vocab = int(hf['vocab_size'])
    if logits.shape[-1] > hf_vocab:
        logits = logits[..., :hf_vocab]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    np.save(args.out, logits)
    shutil.rmtree(tmp_out, ignore_errors=True)
    print(
        f'maxtext_logits: wrote {args.out} shape={logits.shape} model_name={config.model_name} '
        f'scan={config.scan_layers} loader={args.loader}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
