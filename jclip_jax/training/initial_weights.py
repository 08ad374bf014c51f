"""The weights a run starts from when its workdir holds no checkpoint (config.init), as a fresh train state.

    config.init.checkpoint     a jina-clip HF directory, or a previous stage's workdir (its latest params;
                               vision_model/pos_embed resampled when the image size changed between stages)
    config.init.eva02 / jina_bert / jina_embeddings_v3   pretrained towers (stage 1, the paper's init)
    nothing                    the random init of config.seed

With config.text_lora='merged' the text LoRA deltas are folded into the base weights once, at the start.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jclip_jax import loading
from jclip_jax.convert import hf_layout
from jclip_jax.models.clip import JinaCLIP
from jclip_jax.training import checkpoints
from jclip_jax.training import config as config_lib


def initial_state(run, state: dict) -> tuple[dict, str]:
    """(train state, where it came from) for a run (training/setup.TrainSetup) that starts at step 0;
    `state` is run.init_state(), returned as is when the config names no initial weights."""
    params, origin = initial_params(run.config, run.abstract_state["params"])
    if params is not None:
        state = fresh_state(state, run.shardings, params, run.tx)
    if run.config.get("text_lora") == "merged":
        state["params"] = jax.device_put(merged_text_lora(run.graphdef, state["params"]), run.shardings["params"])
        origin += ", text LoRA merged"
    return state, origin


def initial_params(config, abstract_params):
    """Params for a run with no checkpoint in its workdir, as a flat {path: array} dict, or None (scratch),
    and a description of where they come from."""
    init = config.init
    if init.checkpoint:
        if loading.is_hf_directory(init.checkpoint):
            model = loading.load_model(init.checkpoint, require_tokenizer=False)
            return hf_layout.flax_params(model), f"jina-clip directory {init.checkpoint}"
        saved_model, _ = loading.model_config_and_tokenizer(init.checkpoint)
        saved_params = nnx.state(hf_layout.abstract_model(JinaCLIP, saved_model), nnx.Param)
        check_same_model(saved_params, abstract_params, saved_model, config.model,
                         f"config.init.checkpoint={init.checkpoint!r}")
        params, step = checkpoints.restore_params(init.checkpoint, saved_params)  # at its own image size
        return params, f"step {step} of {init.checkpoint}"
    v3 = init.get("jina_embeddings_v3")
    if init.eva02 or init.jina_bert or v3:
        from jclip_jax.convert import towers

        model = JinaCLIP(config.model, rngs=nnx.Rngs(config.seed))
        ignored = {}
        if init.eva02:
            ignored[init.eva02] = towers.import_timm_eva02(model, loading.read_weights(init.eva02), what=init.eva02)
        if init.jina_bert:
            ignored[init.jina_bert] = towers.import_jina_bert_v2(model, loading.read_weights(init.jina_bert),
                                                                 what=init.jina_bert)
        if v3:
            ignored[v3] = towers.import_jina_embeddings_v3(model, loading.read_weights(v3), what=v3)
        text = f"jina_embeddings_v3={v3}" if v3 else f"jina_bert={init.jina_bert}"
        return hf_layout.flax_params(model), f"towers eva02={init.eva02} {text}" + _ignored_note(ignored)
    return None, "scratch"


def _ignored_note(ignored: dict) -> str:
    """'; ignored keys: a.safetensors 3 (k1, k2, ...)' for the tower files with keys the import did not use."""
    parts = [f"{path} {len(keys)} ({', '.join(list(keys)[:3])}{', ...' if len(keys) > 3 else ''})"
             for path, keys in ignored.items() if keys]
    return "; ignored keys: " + "; ".join(parts) if parts else ""


def check_same_model(saved_params, params, saved_model, model, what: str) -> None:
    """Fail in one line, before anything is read, when a previous run's params do not fit this model
    (vision_model/pos_embed excepted: it is resampled to this image size), naming the first parameter
    whose shape differs and the model config fields that differ."""
    shapes = lambda state: {hf_layout.path_key(p): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    theirs, ours = shapes(saved_params), shapes(params)
    theirs.pop(("vision_model", "pos_embed"), None), ours.pop(("vision_model", "pos_embed"), None)
    if theirs == ours:
        return
    key = next(k for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k))
    # Through JSON, as the saved config was (tuples become lists).
    fields = lambda c: config_lib.flat_dict(json.loads(c.to_json_best_effort()))
    a, b = fields(saved_model), fields(model)
    differ = "; ".join(f"model.{k} {a.get(k)} there, {b.get(k)} here" for k in sorted(a.keys() | b.keys())
                       if a.get(k) != b.get(k) and k != "vision.image_size")
    raise ValueError(f"{what} holds another model: parameter {'/'.join(key)} is {theirs.get(key, 'absent')} there, "
                     f"{ours.get(key, 'absent')} in config.model" + (f" ({differ})" if differ else ""))


def fresh_state(state, shardings, params, tx):
    """A fresh train state (new optimizer, step 0) around `params` (an nnx.State or flat dict)."""
    if isinstance(params, nnx.State):
        params = hf_layout.flat_values(params)
    params = resample_image_positions(params, state["params"])
    params = hf_layout.with_values(state["params"], params,
                                   what="config.init (does config.model match the initial weights?)")
    params = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32),
                                                                           shardings["step"])}


def resample_image_positions(params: dict, target_params) -> dict:
    """Initial weights from a run at another image size (the next stage of a multi-resolution recipe): their
    `vision_model/pos_embed` resampled to this model's grid (eva02.resample_pos_embed); other params as given."""
    from jclip_jax.models.eva02 import resample_pos_embed

    key = ("vision_model", "pos_embed")
    target = target_params["vision_model"]["pos_embed"]
    if key not in params or tuple(np.shape(params[key])) == tuple(target.shape):
        return params
    grid = int(round((target.shape[1] - 1) ** 0.5))
    print(f"jclip-train: resampling vision_model/pos_embed {tuple(np.shape(params[key]))} -> {tuple(target.shape)} "
          "for this image size", flush=True)
    return {**params, key: resample_pos_embed(np.asarray(params[key]), grid)}


def merged_text_lora(graphdef, params):
    """params (nnx.State) with every text LoRA delta folded into its base weight and lora_b zeroed."""
    from jclip_jax.models import lora

    model = nnx.merge(graphdef, params)
    lora.merge_lora(model)
    return nnx.state(model, nnx.Param)
