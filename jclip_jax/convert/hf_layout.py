"""A jina-clip checkpoint directory in the Hugging Face layout, both ways (spec §1 and §4).

    DIR/config.json          jina-clip's schema (model_type "jina_clip")
    DIR/model.safetensors    the torch state dict (395 tensors for v1; `logit_scale` 0-d)
    DIR/tokenizer.json       HF tokenizers file (or tokenizer.model for sentencepiece)

Reading and writing need only safetensors + numpy. Text-tower sizes are jina-bert-flash-implementation's
defaults unless `text_config.hf_model_config_kwargs` overrides them, so tiny models use the same loader.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jclip_jax.convert import torch_layout
from jclip_jax.models import configs

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
JINA_BERT_NAME = "jinaai/jina-bert-flash-implementation"
JINA_V3_NAME = "jinaai/jina-embeddings-v3"  # jina-clip-v2's text tower (Jina-XLM-RoBERTa + LoRA)
# config.json text hyper-parameter name -> our text config field (same names, listed for clarity).
TEXT_KWARGS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "type_vocab_size", "layer_norm_eps", "pad_token_id", "hidden_dropout_prob")
# vision_config flags that select the EVA02 variant we implement: field -> the only supported value.
VISION_FIXED = {"naive_swiglu": True, "subln": True, "rope_embeddings": True, "qkv_bias": True,
                "post_norm": False, "ls_init_value": None, "proj_type": None}


def config_to_hf(cfg) -> dict:
    """Our ConfigDict -> jina-clip config.json dict."""
    defaults = configs.text_config()
    kwargs = {"use_flash_attn": False}
    kwargs.update({k: cfg.text[k] for k in TEXT_KWARGS if cfg.text[k] != defaults[k]})
    v = cfg.vision
    out = {
        "architectures": ["JinaCLIPModel"],
        "model_type": "jina_clip",
        "add_projections": bool(cfg.add_projections),
        "projection_dim": int(cfg.projection_dim),
        "logit_scale_init_value": float(cfg.logit_scale_init_value),
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "embed_dim": int(cfg.text.hidden_size),
            "hf_model_name_or_path": JINA_BERT_NAME,
            "hf_model_config_kwargs": kwargs,
            "pooler_type": "mean_pooler",
            "proj_type": None,
            "proj_bias": False,
        },
        "vision_config": {
            "embed_dim": int(v.width), "width": int(v.width), "layers": int(v.layers),
            "head_width": int(v.head_width), "mlp_ratio": float(v.mlp_ratio),
            "image_size": int(v.image_size), "patch_size": int(v.patch_size),
            "pt_hw_seq_len": int(v.pt_hw_seq_len),
            # our RoPE always rescales the grid to pt_hw_seq_len; jina-clip only does so with intp_freq
            "intp_freq": bool(v.intp_freq or v.pt_hw_seq_len != v.image_size // v.patch_size),
            "patch_dropout": float(v.patch_dropout), "drop_path_rate": 0.0, "fused_layer_norm": False,
            "x_attention": False, **VISION_FIXED,
        },
    }
    if cfg.text.get("model_type") == "xlm_roberta":
        out["text_config"] = xlm_roberta_text_to_hf(cfg.text)
    if cfg.matryoshka_dimensions:
        out["matryoshka_dimensions"] = [int(d) for d in cfg.matryoshka_dimensions]
    return out


# config.json fields and the JSON types they must have (bool is not an int here).
FIELD_TYPES = {
    "vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
    "intermediate_size": int, "type_vocab_size": int, "pad_token_id": int, "layer_norm_eps": float,
    "hidden_dropout_prob": float, "image_size": int, "patch_size": int, "width": int, "layers": int,
    "head_width": int, "mlp_ratio": float, "pt_hw_seq_len": int, "intp_freq": bool, "patch_dropout": float,
    "add_projections": bool, "projection_dim": int, "logit_scale_init_value": float,
}


def check_field_types(hf: dict, source: str = CONFIG_FILE) -> None:
    """Fail in one line naming the field and value when a config.json field has the wrong JSON type."""
    tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
    sections = [("", hf), ("vision_config.", vc),
                ("text_config.hf_model_config_kwargs.", tc.get("hf_model_config_kwargs") or {})]
    for where, d in sections:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: {where.rstrip('.')} must be a JSON object, got {d!r:.80}")
        for key, kind in FIELD_TYPES.items():
            if key not in d or (where == "" and key not in ("add_projections", "projection_dim",
                                                            "logit_scale_init_value")):
                continue
            value = d[key]
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"{source}: {where}{key}={value!r} must be a JSON {kind.__name__}")
    dims = hf.get("matryoshka_dimensions") or []
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"{source}: matryoshka_dimensions={dims!r} must be a list of ints")


# config.json text hyper-parameters of the v2 tower that travel in hf_model_config_kwargs when they differ from
# jina-embeddings-v3's (tiny test models); rotary_emb_base is 20000 in jina-embeddings-v3's own config.json.
XLM_ROBERTA_KWARGS = TEXT_KWARGS + ("rotary_emb_base",)


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def xlm_roberta_text_to_hf(text) -> dict:
    """v2 text config -> jina-clip-v2's text_config (spec §5.4's schema)."""
    defaults = configs.xlm_roberta_text_config()
    kwargs = {
        "load_trained_adapters": False,
        "lora_adaptations": list(text.lora_adaptations),
        "lora_alpha": _number(text.lora_alpha),
        "lora_dropout_p": 0.0,
        "lora_main_params_trainable": False,
        "lora_rank": int(text.lora_rank),
        "task_instructions": {task: instruction for task, instruction in text.task_instructions},
        "use_flash_attn": False,
    }
    kwargs.update({k: text[k] for k in XLM_ROBERTA_KWARGS if text[k] != defaults[k]})
    return {
        "default_instruction_task": None,
        "default_lora_task": text.default_lora_task if text.lora_adaptations else None,
        "embed_dim": int(text.hidden_size),
        "hf_model_name_or_path": JINA_V3_NAME,
        "hf_model_config_kwargs": kwargs,
        "pooler_type": "mean_pooler",
        "proj_type": None,
        "proj_bias": False,
    }


def xlm_roberta_text_from_hf(tc: dict, source: str) -> ml_collections.ConfigDict:
    """jina-clip-v2's text_config -> our v2 text config; sizes default to jina-embeddings-v3's."""
    kwargs = dict(tc.get("hf_model_config_kwargs") or {})
    text = configs.xlm_roberta_text_config(**{k: kwargs[k] for k in XLM_ROBERTA_KWARGS if k in kwargs})
    if "lora_adaptations" in kwargs:
        text.lora_adaptations = tuple(kwargs["lora_adaptations"] or ())
    text.lora_rank = int(kwargs.get("lora_rank", text.lora_rank))
    text.lora_alpha = float(kwargs.get("lora_alpha", text.lora_alpha))
    if "task_instructions" in kwargs:
        text.task_instructions = tuple((str(k), str(v)) for k, v in (kwargs["task_instructions"] or {}).items())
    text.default_lora_task = tc.get("default_lora_task") or (text.lora_adaptations[0] if text.lora_adaptations
                                                             else None)
    if text.lora_adaptations and text.default_lora_task not in text.lora_adaptations:
        raise ValueError(f"{source}: text_config.default_lora_task={text.default_lora_task!r} is not one of "
                         f"hf_model_config_kwargs.lora_adaptations={list(text.lora_adaptations)}")
    return text


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ml_collections.ConfigDict:
    """jina-clip config.json dict -> our ConfigDict; unsupported variants fail naming the field."""
    def need(d, key, where):
        if key not in d:
            raise ValueError(f"{source}: missing field {where}{key}")
        return d[key]

    if not isinstance(hf, dict):
        raise ValueError(f"{source}: must hold a JSON object")
    check_field_types(hf, source)

    tc, vc = need(hf, "text_config", ""), need(hf, "vision_config", "")
    name = tc.get("hf_model_name_or_path", JINA_BERT_NAME)
    v2_text = "jina-embeddings-v3" in name or "xlm-roberta" in name
    if "jina-bert" not in name and not v2_text:
        raise ValueError(f"{source}: text_config.hf_model_name_or_path={name!r} is not supported; only the "
                         "Jina-BERT-v2 (jina-clip-v1) and Jina-XLM-RoBERTa (jina-clip-v2) towers are implemented")
    if tc.get("pooler_type", "mean_pooler") != "mean_pooler":
        raise ValueError(f"{source}: text_config.pooler_type={tc['pooler_type']!r}; only mean_pooler is supported")
    kwargs = dict(tc.get("hf_model_config_kwargs") or {})
    text = configs.text_config(**{k: kwargs[k] for k in TEXT_KWARGS if k in kwargs})
    if v2_text:
        text = xlm_roberta_text_from_hf(tc, source)
    for k, want in VISION_FIXED.items():
        if k in vc and vc[k] != want:
            raise ValueError(f"{source}: vision_config.{k}={vc[k]!r} is not supported (only {want!r})")
    vision = configs.vision_config(
        image_size=need(vc, "image_size", "vision_config."), patch_size=need(vc, "patch_size", "vision_config."),
        width=need(vc, "width", "vision_config."), layers=need(vc, "layers", "vision_config."),
        head_width=need(vc, "head_width", "vision_config."), mlp_ratio=need(vc, "mlp_ratio", "vision_config."),
        pt_hw_seq_len=vc.get("pt_hw_seq_len", 16), intp_freq=vc.get("intp_freq", False),
        patch_dropout=vc.get("patch_dropout", 0.0),
    )
    cfg = configs.clip_config(
        text=text, vision=vision, add_projections=bool(hf.get("add_projections", False)),
        projection_dim=int(hf.get("projection_dim", text.hidden_size)),
        logit_scale_init_value=float(hf.get("logit_scale_init_value", 2.6592)),
        matryoshka_dimensions=tuple(hf.get("matryoshka_dimensions") or ()),
    )
    if not cfg.add_projections and text.hidden_size != vision.width:
        raise ValueError(f"{source}: without projections the towers must agree in width; text hidden_size="
                         f"{text.hidden_size}, vision width={vision.width}")
    if not vision.intp_freq and vision.pt_hw_seq_len != vision.image_size // vision.patch_size:
        raise ValueError(f"{source}: vision_config.pt_hw_seq_len={vision.pt_hw_seq_len} must equal the patch grid "
                         f"{vision.image_size // vision.patch_size} when intp_freq is false")
    return cfg


def path_key(path) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def flat_values(state) -> dict[tuple[str, ...], jax.Array]:
    """Flat {path: array} of an nnx.State's values."""
    return {path_key(path): v.get_value() for path, v in nnx.to_flat_state(state)}


def flax_params(model) -> dict[tuple[str, ...], jax.Array]:
    """Flat {path: array} of a model's nnx.Param values."""
    return flat_values(nnx.state(model, nnx.Param))


def with_values(state, params: dict[tuple[str, ...], np.ndarray], *, partial: bool = False,
                what: str = "weights"):
    """`state` with its values replaced from flat `params` (cast to each variable's dtype).

    Every variable must be in `params` with its own shape, unless partial=True (then absent ones keep
    their value); a mismatch fails naming the parameter and both shapes.
    """
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = path_key(path)
        if key in params:
            if tuple(np.shape(params[key])) != tuple(var.shape):
                raise ValueError(f"{what}: parameter {'/'.join(key)} should be {tuple(var.shape)}, "
                                 f"got {tuple(np.shape(params[key]))}")
            var = var.replace(jnp.asarray(params[key], dtype=var.dtype))
        elif not partial:
            raise ValueError(f"{what}: no value for parameter {'/'.join(key)}")
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def abstract_model(model_cls, cfg, tokenizer=None):
    """The model's graph with ShapeDtypeStruct params: nothing is allocated or initialised."""
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), tokenizer=tokenizer))


def merge_params(abstract, params: dict[tuple[str, ...], np.ndarray]):
    """Fill an abstract model's params with arrays (cast to each param's dtype)."""
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, with_values(state, params))


def read_config(directory) -> ml_collections.ConfigDict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {os.fspath(directory)!r}")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    return config_from_hf(hf, source=path)


def read_state_dict(path) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {os.fspath(path)!r}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' errors (truncated, bad header) do not name the file
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors file "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def tensor_problems(state_dict: dict[str, np.ndarray], float_keys=None) -> list[str]:
    """What `jclip-convert check` reports: tensors holding NaN/Inf, and integer tensors where the model
    has float parameters (loading would cast them silently). `float_keys`: keys of float slots (None: all)."""
    problems = []
    for key, value in sorted(state_dict.items()):
        if np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V":  # V: bfloat16 via ml_dtypes
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value.astype(np.float32))))
            if bad:
                problems.append(f"{key} holds {bad} NaN/Inf of {np.size(value)} values")
        elif float_keys is None or key in float_keys:
            problems.append(f"{key} is {value.dtype} where the model has a float parameter")
    return problems


def load_tokenizer(directory):
    from jclip_jax.tokenizer import TextTokenizer

    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return TextTokenizer(path)
    return None


def load_pretrained(model_cls, directory, **overrides):
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"from_pretrained takes a directory ({CONFIG_FILE} + {WEIGHTS_FILE}), not the file "
                         f"{directory!r}; pass {os.path.dirname(directory) or '.'!r}")
    cfg = read_config(directory)
    for k, v in overrides.items():
        if k not in ("dtype", "param_dtype", "remat", "scan_layers", "attention"):
            raise ValueError(f"from_pretrained: unknown option {k!r} (dtype, param_dtype, remat, scan_layers, "
                             "attention)")
        cfg[k] = v
    weights = os.path.join(directory, WEIGHTS_FILE)
    state_dict = read_state_dict(weights)
    abstract = abstract_model(model_cls, cfg, tokenizer=load_tokenizer(directory))
    shapes = {k: tuple(v.shape) for k, v in flax_params(abstract).items()}
    torch_layout.check_keys(cfg, state_dict, shapes, what=weights)
    return merge_params(abstract, torch_layout.to_flax(cfg, state_dict, shapes))


def save_pretrained(model, directory) -> None:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(model.cfg), f, indent=2)
    params = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flax_params(model).items()}
    state_dict = {k: np.array(v, order="C") for k, v in torch_layout.to_torch(model.cfg, params).items()}
    save_file(state_dict, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        target = "tokenizer.model" if tok.path.endswith(".model") else "tokenizer.json"
        dst = os.path.join(directory, target)
        if os.path.abspath(tok.path) != os.path.abspath(dst):
            shutil.copyfile(tok.path, dst)
