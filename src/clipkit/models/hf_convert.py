"""open_clip towers <-> Hugging Face transformers `CLIPModel` / `SiglipModel`: configs and weights, both ways.

Two layouts convert:
- "clip": open_clip's native towers (ViT image tower, built-in causal text transformer), either loss, become a
  `CLIPModel`. A SigLIP-loss model's logit bias has no place in `CLIPModel`; it travels as `logit_bias` in the
  config and comes back on import.
- "siglip": open_clip's timm-tower SigLIP (ViT-B-16-SigLIP and its family: a timm ViT without class token
  pooled by a MAP head, and a bidirectional text tower pooled at its last token with a biased projection)
  becomes a `SiglipModel`.

Anything else stops with one line naming the config keys that transformers cannot express. Weights move by
rules: each names open_clip tensors and transformers tensors whose concatenations along dim 0 are equal
(open_clip's packed q/k/v attention input is transformers' separate q, k and v), optionally transposed
(open_clip's projections are `x @ W`, transformers' are `nn.Linear`). The same rules run both ways, and every
tensor on both sides must be used by exactly one rule, so nothing is silently dropped or left random.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)

OPEN_CLIP_LN_EPS = 1e-5  # open_clip's LayerNorm default, unless norm_kwargs.eps says otherwise
CLIP_BPE_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer: <start_of_text> = 49406, <end_of_text> = 49407
CLIP_BPE_EOT = 49407
# transformers' CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2 (configs from before
# transformers PR #24773) and at the first eos_token_id otherwise.
HF_LEGACY_ARGMAX_EOS_ID = 2
_NO_CUSTOM_BLOCK = (
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)


def require_transformers():
    """transformers, imported on first use: only the export/import to Hugging Face needs it."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise ClipkitError(
            "converting to or from Hugging Face transformers needs the `transformers` package: "
            "pip install 'transformers>=5'"
        ) from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:  # the tokenizer export builds tokenizers with transformers 5's constructors
        raise ClipkitError(
            f"converting to or from Hugging Face transformers needs transformers>=5, found "
            f"{transformers.__version__}: pip install -U 'transformers>=5'"
        )
    return transformers


# ----------------------------------------------------------------------------------------------------------
# Which layout a config has, or why it has none.


def hf_layout(model_cfg: Mapping[str, Any]) -> str:
    """The transformers layout of `model_cfg`, "clip" or "siglip"; a ClipkitError naming every blocking key
    otherwise."""
    vision = {**_dataclass_defaults(CLIPVisionCfg), **model_cfg.get("vision_cfg", {})}
    text = {**_dataclass_defaults(CLIPTextCfg), **model_cfg.get("text_cfg", {})}
    layout = "siglip" if vision.get("timm_model_name") else "clip"
    blocking = _blocking_keys(vision, text, layout, quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    if blocking:
        target = "SiglipModel" if layout == "siglip" else "CLIPModel"
        raise ClipkitError(
            f"this model cannot become a transformers {target}: transformers cannot express "
            + ", ".join(blocking)
            + " (convertible: open_clip's native ViT + text towers, or timm-tower SigLIP like ViT-B-16-SigLIP)"
        )
    return layout


def _blocking_keys(vision: dict, text: dict, layout: str, *, quick_gelu: bool) -> list[str]:
    blocking = []

    def need(tower: str, cfg: dict, key: str, ok: bool) -> None:
        if not ok:
            blocking.append(f"{tower}.{key}={cfg.get(key)!r}")

    if layout == "clip":
        need("vision_cfg", vision, "layers", isinstance(vision["layers"], int))  # a tuple is a ResNet
        size = vision["image_size"]
        need("vision_cfg", vision, "image_size", isinstance(size, int) or len(set(size)) == 1)
        need("vision_cfg", vision, "ls_init_value", vision["ls_init_value"] is None)
        need("vision_cfg", vision, "attentional_pool", not vision["attentional_pool"])
        need("vision_cfg", vision, "no_ln_pre", not vision["no_ln_pre"])
        need("vision_cfg", vision, "pos_embed_type", vision["pos_embed_type"] == "learnable")
        # final_ln_after_pool is fine here: LayerNorm acts per token, so it commutes with picking the class token.
        need("vision_cfg", vision, "pool_type", vision["pool_type"] == "tok")
        _check_common_block(need, "vision_cfg", vision, quick_gelu)
    else:
        need("vision_cfg", vision, "timm_pool", vision["timm_pool"] == "map")
        need("vision_cfg", vision, "timm_proj", vision["timm_proj"] in ("none", "", None))
    need("text_cfg", text, "hf_model_name", not text.get("hf_model_name"))
    need("text_cfg", text, "ls_init_value", text["ls_init_value"] is None)
    need("text_cfg", text, "embed_cls", not text["embed_cls"])
    need("text_cfg", text, "proj_type", text["proj_type"] == "linear")
    _check_common_block(need, "text_cfg", text, quick_gelu)
    if layout == "clip":  # CLIPTextModel: causal, pooled at the end token, projection without bias
        need("text_cfg", text, "no_causal_mask", not text["no_causal_mask"])
        need("text_cfg", text, "pool_type", text["pool_type"] in ("argmax", "eos"))
        need("text_cfg", text, "proj_bias", not text["proj_bias"])
        if text["pool_type"] == "eos":
            need("text_cfg", text, "eos_id", text["eos_id"] != HF_LEGACY_ARGMAX_EOS_ID)
    else:  # SiglipTextModel: bidirectional, pooled at the last position, projection with bias
        need("text_cfg", text, "no_causal_mask", bool(text["no_causal_mask"]))
        need("text_cfg", text, "pool_type", text["pool_type"] == "last")
        need("text_cfg", text, "proj_bias", bool(text["proj_bias"]))
    return blocking


def _check_common_block(need, tower: str, cfg: dict, quick_gelu: bool) -> None:
    need(tower, cfg, "block_type", cfg.get("block_type") in (None, "default"))
    for key in _NO_CUSTOM_BLOCK:
        need(tower, cfg, key, not cfg.get(key))
    need(tower, cfg, "norm_kwargs", set(cfg.get("norm_kwargs") or {}) <= {"eps"})
    need(tower, cfg, "act_kwargs", _hidden_act(quick_gelu, cfg.get("act_kwargs")) is not None)


def _dataclass_defaults(cls) -> dict[str, Any]:
    return {
        f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)
    }


def _hidden_act(quick_gelu: bool, act_kwargs: Mapping[str, Any] | None) -> str | None:
    """transformers' `hidden_act` for open_clip's activation; None when it has no equivalent."""
    act_kwargs = dict(act_kwargs or {})
    if quick_gelu:
        return "quick_gelu" if not act_kwargs else None
    approximate = act_kwargs.pop("approximate", "none")
    if act_kwargs:
        return None
    return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(approximate)


def _act_kwargs(hidden_act: str) -> tuple[bool, dict[str, Any] | None]:
    """(quick_gelu, act_kwargs) for transformers' `hidden_act`."""
    if hidden_act == "quick_gelu":
        return True, None
    if hidden_act == "gelu":
        return False, None
    if hidden_act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):  # all three are the tanh approximation
        return False, {"approximate": "tanh"}
    raise ClipkitError(
        f"hidden_act {hidden_act!r} has no open_clip equivalent (quick_gelu, gelu, gelu_pytorch_tanh)"
    )


# ----------------------------------------------------------------------------------------------------------
# open_clip -> transformers


def hf_config_for(
    model: torch.nn.Module, model_cfg: Mapping[str, Any], *, eos_token_id: int, pad_token_id: int,
    bos_token_id: int | None,
):  # fmt: skip
    """The transformers `CLIPConfig` / `SiglipConfig` of an open_clip model (its layout checked first)."""
    transformers = require_transformers()
    layout = hf_layout(model_cfg)
    text = {**_dataclass_defaults(CLIPTextCfg), **model_cfg["text_cfg"]}
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    text_act = _hidden_act(quick_gelu, text.get("act_kwargs"))
    text_config = dict(
        vocab_size=text["vocab_size"],
        hidden_size=text["width"],
        intermediate_size=int(text["width"] * text["mlp_ratio"]),
        num_hidden_layers=text["layers"],
        num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"],
        hidden_act=text_act,
        layer_norm_eps=(text.get("norm_kwargs") or {}).get("eps", OPEN_CLIP_LN_EPS),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    embed_dim = model_cfg["embed_dim"]
    if layout == "clip":
        vision = {**_dataclass_defaults(CLIPVisionCfg), **model_cfg["vision_cfg"]}
        size = vision["image_size"]
        vision_config = dict(
            hidden_size=vision["width"],
            intermediate_size=int(vision["width"] * vision["mlp_ratio"]),
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["width"] // vision["head_width"],
            image_size=size if isinstance(size, int) else size[0],
            patch_size=vision["patch_size"],
            hidden_act=_hidden_act(quick_gelu, vision.get("act_kwargs")),
            layer_norm_eps=(vision.get("norm_kwargs") or {}).get("eps", OPEN_CLIP_LN_EPS),
            projection_dim=embed_dim,
        )
        text_config["projection_dim"] = embed_dim
        config = transformers.CLIPConfig(
            text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
            logit_scale_init_value=float(model.logit_scale.detach().reshape(())),
        )  # fmt: skip
        if getattr(model, "logit_bias", None) is not None:
            # CLIPModel has no bias parameter; keep the value so an import restores the SigLIP-loss model.
            config.logit_bias = float(model.logit_bias.detach().reshape(()))
        return config
    vision_config = _siglip_vision_config(model.visual.trunk, model_cfg)
    text_config["projection_size"] = embed_dim
    return transformers.SiglipConfig(text_config=text_config, vision_config=vision_config)


def _siglip_vision_config(trunk: torch.nn.Module, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """SiglipVisionConfig values read off the timm trunk, after checking it is the SigLIP kind of ViT."""
    name = model_cfg["vision_cfg"]["timm_model_name"]
    block = trunk.blocks[0] if hasattr(trunk, "blocks") and len(trunk.blocks) else None
    checks = {
        "a timm VisionTransformer": block is not None and hasattr(trunk, "patch_embed"),
        "no class token": getattr(trunk, "cls_token", 0) is None,
        "no register tokens": getattr(trunk, "reg_token", 0) is None,
        "no pre-norm": isinstance(getattr(trunk, "norm_pre", None), torch.nn.Identity),
        "no layer scale": block is not None and isinstance(getattr(block, "ls1", None), torch.nn.Identity),
        "no qk-norm": block is not None
        and isinstance(getattr(block.attn, "q_norm", None), torch.nn.Identity),
        "a plain MAP head": _is_plain_map_head(getattr(trunk, "attn_pool", None)),
        "no fc_norm": isinstance(getattr(trunk, "fc_norm", None), torch.nn.Identity),
        "a fixed image size": not getattr(trunk, "dynamic_img_size", False),
    }
    missing = [what for what, ok in checks.items() if not ok]
    if missing:
        raise ClipkitError(
            f"vision_cfg.timm_model_name={name!r} cannot become a transformers SiglipModel: it needs "
            + ", ".join(missing)
        )
    act = block.mlp.act
    if isinstance(act, torch.nn.GELU):
        hidden_act = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    else:
        raise ClipkitError(
            f"vision_cfg.timm_model_name={name!r}: activation {type(act).__name__} has no SiglipModel equivalent"
        )
    patch = trunk.patch_embed
    return dict(
        hidden_size=trunk.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(trunk.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=patch.img_size[0],
        patch_size=patch.patch_size[0],
        hidden_act=hidden_act,
        layer_norm_eps=trunk.norm.eps,
        vision_use_head=True,
    )


def _is_plain_map_head(pool) -> bool:
    return (
        pool is not None
        and type(pool).__name__ == "AttentionPoolLatent"
        and pool.latent_len == 1
        and getattr(pool, "pos_embed", None) is None
        and isinstance(pool.q_norm, torch.nn.Identity)
        and pool.pool == "token"
    )


def to_hf_model(model: torch.nn.Module, model_cfg: Mapping[str, Any], **token_ids):
    """A transformers CLIPModel / SiglipModel holding the same weights as the open_clip `model`."""
    transformers = require_transformers()
    config = hf_config_for(model, model_cfg, **token_ids)
    hf_class = transformers.CLIPModel if config.model_type == "clip" else transformers.SiglipModel
    hf_model = hf_class(config).eval()
    source = model.state_dict()
    rules = weight_rules(hf_layout(model_cfg), source, config)
    if config.model_type == "clip":
        source.pop("logit_bias", None)  # in the config (see hf_config_for)
    state_dict = convert_state_dict(source, rules, hf_model.state_dict(), forward=True)
    hf_model.load_state_dict(state_dict, strict=True)
    return hf_model


# ----------------------------------------------------------------------------------------------------------
# transformers -> open_clip


def open_clip_cfg_from_hf(config) -> dict[str, Any]:
    """open_clip's `model_cfg` for a transformers CLIPConfig / SiglipConfig (tokenizer keys not included)."""
    text, vision = config.text_config, config.vision_config
    if config.model_type not in ("clip", "siglip"):
        raise ClipkitError(
            f"model_type {config.model_type!r} is not a transformers CLIP or SigLIP model (clip, siglip)"
        )
    text_quick, text_act = _act_kwargs(text.hidden_act)
    text_cfg: dict[str, Any] = dict(
        context_length=text.max_position_embeddings,
        vocab_size=text.vocab_size,
        width=text.hidden_size,
        heads=text.num_attention_heads,
        layers=text.num_hidden_layers,
        mlp_ratio=text.intermediate_size / text.hidden_size,
        norm_kwargs={"eps": text.layer_norm_eps},
    )
    if text_act:
        text_cfg["act_kwargs"] = text_act
    if config.model_type == "clip":
        vision_quick, vision_act = _act_kwargs(vision.hidden_act)
        if vision_quick != text_quick:
            raise ClipkitError(
                f"hidden_act: vision {vision.hidden_act!r}, text {text.hidden_act!r}; open_clip uses "
                "quick_gelu for both towers or neither"
            )
        vision_cfg: dict[str, Any] = dict(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.hidden_size,
            layers=vision.num_hidden_layers,
            head_width=vision.hidden_size // vision.num_attention_heads,
            mlp_ratio=vision.intermediate_size / vision.hidden_size,
            norm_kwargs={"eps": vision.layer_norm_eps},
        )
        if vision_act:
            vision_cfg["act_kwargs"] = vision_act
        if text.eos_token_id == HF_LEGACY_ARGMAX_EOS_ID:
            text_cfg["pool_type"] = "argmax"
        else:
            text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
        model_cfg = {"embed_dim": config.projection_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
        if text_quick:
            model_cfg["quick_gelu"] = True
        if getattr(config, "logit_bias", None) is not None:
            model_cfg["init_logit_bias"] = float(config.logit_bias)
        return model_cfg
    if vision.hidden_act != "gelu":
        # timm's SigLIP ViT has exact GELU; open_clip's own ports of Google's SigLIP accept the same gap.
        log.warning(
            "the SigLIP image tower uses %s; open_clip's timm tower computes exact GELU, so image embeddings "
            "differ slightly from transformers'", vision.hidden_act,
        )  # fmt: skip
    text_cfg.update(no_causal_mask=True, proj_bias=True, pool_type="last")
    model_cfg = {
        "embed_dim": text.projection_size,
        "custom_text": True,
        "init_logit_bias": -10.0,  # replaced by the checkpoint's; makes open_clip create the bias parameter
        "vision_cfg": {
            "image_size": vision.image_size,
            "timm_model_name": timm_siglip_name(vision),
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": text_cfg,
    }
    if text_quick:
        model_cfg["quick_gelu"] = True
    if vision.hidden_size != text.projection_size:
        raise ClipkitError(
            f"vision hidden_size {vision.hidden_size} differs from text projection_size {text.projection_size}; "
            "a SigLIP image tower has no projection, so they must match"
        )
    return model_cfg


def timm_siglip_name(vision) -> str:
    """The timm SigLIP ViT with the checkpoint's width, depth, heads, MLP and patch size (any image size:
    open_clip resizes the position embedding to vision_cfg.image_size)."""
    import timm

    wanted = (
        vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
        vision.patch_size,
    )  # fmt: skip
    for name in sorted(timm.list_models("vit_*_siglip_*")):
        if "gap" in name:  # global-average-pooled variants have no MAP head
            continue
        with torch.device("meta"):
            trunk = timm.create_model(name, pretrained=False)
        block = trunk.blocks[0]
        found = (
            trunk.embed_dim, len(trunk.blocks), block.attn.num_heads, block.mlp.fc1.out_features,
            trunk.patch_embed.patch_size[0],
        )  # fmt: skip
        if found == wanted and getattr(trunk, "attn_pool", None) is not None:
            return name
    raise ClipkitError(
        "no timm SigLIP ViT has width {}, depth {}, {} heads, MLP {} and patch size {}; open_clip builds SigLIP "
        "image towers from timm, so this checkpoint's image tower has no open_clip equivalent".format(*wanted)
    )


# ----------------------------------------------------------------------------------------------------------
# Weight rules: (open_clip names, transformers names, transpose).

Rule = tuple[tuple[str, ...], tuple[str, ...], bool]


def weight_rules(layout: str, open_clip_state: Mapping[str, torch.Tensor], config) -> list[Rule]:
    text = "text." if "text.token_embedding.weight" in open_clip_state else ""
    rules: list[Rule] = [
        ((f"{text}token_embedding.weight",), ("text_model.embeddings.token_embedding.weight",), False),
        ((f"{text}positional_embedding",), ("text_model.embeddings.position_embedding.weight",), False),
        *_pair(f"{text}ln_final", "text_model.final_layer_norm"),
        (("logit_scale",), ("logit_scale",), False),
    ]
    for i in range(config.text_config.num_hidden_layers):
        rules += _open_clip_block(f"{text}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.")
    if layout == "clip":
        rules += [
            (("visual.class_embedding",), ("vision_model.embeddings.class_embedding",), False),
            (("visual.conv1.weight",), ("vision_model.embeddings.patch_embedding.weight",), False),
            (("visual.positional_embedding",), ("vision_model.embeddings.position_embedding.weight",), False),
            *_pair("visual.ln_pre", "vision_model.pre_layrnorm"),
            *_pair("visual.ln_post", "vision_model.post_layernorm"),
            (("visual.proj",), ("visual_projection.weight",), True),
            ((f"{text}text_projection",), ("text_projection.weight",), True),
        ]
        for i in range(config.vision_config.num_hidden_layers):
            rules += _open_clip_block(
                f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
            )
        return rules
    trunk, head = "visual.trunk.", "vision_model.head."
    rules += [
        (("logit_bias",), ("logit_bias",), False),
        *_pair(f"{text}text_projection", "text_model.head"),
        *_pair(f"{trunk}patch_embed.proj", "vision_model.embeddings.patch_embedding"),
        ((f"{trunk}pos_embed",), ("vision_model.embeddings.position_embedding.weight",), False),
        *_pair(f"{trunk}norm", "vision_model.post_layernorm"),
        ((f"{trunk}attn_pool.latent",), (f"{head}probe",), False),
        (
            (f"{trunk}attn_pool.q.weight", f"{trunk}attn_pool.kv.weight"),
            (f"{head}attention.in_proj_weight",),
            False,
        ),
        (
            (f"{trunk}attn_pool.q.bias", f"{trunk}attn_pool.kv.bias"),
            (f"{head}attention.in_proj_bias",),
            False,
        ),
        *_pair(f"{trunk}attn_pool.proj", f"{head}attention.out_proj"),
        *_pair(f"{trunk}attn_pool.norm", f"{head}layernorm"),
        *_pair(f"{trunk}attn_pool.mlp.fc1", f"{head}mlp.fc1"),
        *_pair(f"{trunk}attn_pool.mlp.fc2", f"{head}mlp.fc2"),
    ]
    for i in range(config.vision_config.num_hidden_layers):
        rules += _timm_block(f"{trunk}blocks.{i}.", f"vision_model.encoder.layers.{i}.")
    return rules


def _pair(open_clip_module: str, hf_module: str) -> list[Rule]:
    return [((f"{open_clip_module}.{p}",), (f"{hf_module}.{p}",), False) for p in ("weight", "bias")]


def _qkv(packed: str, hf_attention: str) -> list[Rule]:
    # Packed input projection rows are [q; k; v], each (width, width).
    return [
        ((f"{packed}_{p}" if packed.endswith("in_proj") else f"{packed}.{p}",),
         tuple(f"{hf_attention}{x}_proj.{p}" for x in "qkv"), False)
        for p in ("weight", "bias")
    ]  # fmt: skip


def _open_clip_block(prefix: str, hf: str) -> list[Rule]:
    return [
        *_pair(f"{prefix}ln_1", f"{hf}layer_norm1"),
        *_qkv(f"{prefix}attn.in_proj", f"{hf}self_attn."),
        *_pair(f"{prefix}attn.out_proj", f"{hf}self_attn.out_proj"),
        *_pair(f"{prefix}ln_2", f"{hf}layer_norm2"),
        *_pair(f"{prefix}mlp.c_fc", f"{hf}mlp.fc1"),
        *_pair(f"{prefix}mlp.c_proj", f"{hf}mlp.fc2"),
    ]


def _timm_block(prefix: str, hf: str) -> list[Rule]:
    return [
        *_pair(f"{prefix}norm1", f"{hf}layer_norm1"),
        *_qkv(f"{prefix}attn.qkv", f"{hf}self_attn."),
        *_pair(f"{prefix}attn.proj", f"{hf}self_attn.out_proj"),
        *_pair(f"{prefix}norm2", f"{hf}layer_norm2"),
        *_pair(f"{prefix}mlp.fc1", f"{hf}mlp.fc1"),
        *_pair(f"{prefix}mlp.fc2", f"{hf}mlp.fc2"),
    ]


def convert_state_dict(
    source: Mapping[str, torch.Tensor],
    rules: list[Rule],
    target: Mapping[str, torch.Tensor],
    *,
    forward: bool,
) -> dict[str, torch.Tensor]:
    """`source` renamed and reshaped into `target`'s names and shapes. forward: open_clip -> transformers."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for open_clip_names, hf_names, transpose in rules:
        names_in, names_out = (open_clip_names, hf_names) if forward else (hf_names, open_clip_names)
        missing = [n for n in names_in if n not in source]
        if missing:
            raise ClipkitError(f"weights are missing {missing[0]} (and {len(missing) - 1} more of this rule)")
        used.update(names_in)
        # .reshape(-1, ...) lines up 1-element logit parameters stored as () or (1,); rows are dim 0.
        tensor = torch.cat([source[n].detach().reshape(-1, *source[n].shape[1:]) for n in names_in])
        if transpose:
            tensor = tensor.t()
        if len(names_out) == 1:  # e.g. timm's (1, N, D) position embedding is transformers' (N, D)
            sizes = [tensor.shape[0]] if tensor.numel() == target[names_out[0]].numel() else [-1]
        else:
            sizes = [target[n].shape[0] for n in names_out]
        if tensor.shape[0] != sum(sizes):
            raise ClipkitError(
                f"{names_in[0]}: {tuple(tensor.shape)} does not fit {names_out} (sizes {sizes})"
            )
        for name, part in zip(names_out, tensor.split(sizes), strict=True):
            out[name] = part.reshape(target[name].shape).clone().contiguous()
    unused = sorted(set(source) - used)
    if unused:
        raise ClipkitError(f"no conversion rule for {len(unused)} tensor(s), e.g. {unused[0]}")
    unset = sorted(set(target) - set(out))
    if unset:
        raise ClipkitError(f"conversion leaves {len(unset)} tensor(s) unset, e.g. {unset[0]}")
    return out


def from_hf_state_dict(
    model: torch.nn.Module, model_cfg: Mapping[str, Any], hf_state: Mapping[str, torch.Tensor], config
) -> dict[str, torch.Tensor]:
    """The open_clip state dict for `model` (built from `open_clip_cfg_from_hf(config)`) from transformers
    weights."""
    target = model.state_dict()
    rules = weight_rules(hf_layout(model_cfg), target, config)
    # position_ids buffers: saved by older transformers versions, not parameters.
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("position_ids")}
    clip_bias = config.model_type == "clip" and "logit_bias" in target  # from the config, not the weights
    state_dict = convert_state_dict(
        hf_state,
        rules,
        {k: v for k, v in target.items() if not (clip_bias and k == "logit_bias")},
        forward=False,
    )
    if clip_bias:
        state_dict["logit_bias"] = torch.full(target["logit_bias"].shape, float(config.logit_bias))
    return state_dict
