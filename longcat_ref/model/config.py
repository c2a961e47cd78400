"""Model configuration: one dataclass for LongCat-Flash and GLM-4.7-Flash (Glm4MoeLite).

Both models are built from the same blocks (MLA attention, a top-k router, SwiGLU experts). What differs is
configuration, read here from a Hugging Face `config.json`:

    field                 LongCat-Flash-Chat          GLM-4.7-Flash
    layer kind            shortcut (2 attn + 2 FFN)    standard pre-norm (1 attn + 1 FFN)
    router                softmax over routed+zero     sigmoid, group-limited (DeepSeek-V3 "noaux_tc")
    zero experts          256 identity experts         none
    shared experts        none                         1
    MLA LoRA scales       sqrt(H/q_lora), sqrt(H/kv)   none

`load_config(path)` accepts transformers' field names, the original LongCat remote-code keys (`mla_scale_q_lora`,
`zero_expert_type`, `router_bias`, ...) and the keys of the real published config.json files (LongCat-Flash-Chat's,
which has `model_type: longcat_flash`, and GLM-4.7-Flash's, with a top-level `partial_rotary_factor`). Every field is
type- and range-checked, and absurd sizes are refused from arithmetic before anything is built. An unknown field, a
wrong type, or values that don't add up raise a one-line `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

LONGCAT = "longcat_flash"
GLM = "glm4_moe_lite"
MODEL_TYPES = (LONGCAT, GLM)


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can build."""


@dataclass
class ModelConfig:
    model_type: str = LONGCAT
    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28  # logical layers (a LongCat layer holds 2 attention sublayers)
    num_attention_heads: int = 64
    # MLA
    q_lora_rank: int | None = 1536  # None: a plain q_proj (GLM variant)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_scale_q_lora: bool = True  # LongCat multiplies q by sqrt(H / q_lora_rank)
    mla_scale_kv_lora: bool = True  # ... and the latent by sqrt(H / kv_lora_rank)
    attention_bias: bool = False
    rope_theta: float = 1e7
    rope_interleave: bool = True
    max_position_embeddings: int = 131072
    # FFNs
    ffn_hidden_size: int = 12288  # dense SwiGLU width
    expert_ffn_hidden_size: int = 2048  # one routed expert's width
    hidden_act: str = "silu"
    # MoE / router
    n_routed_experts: int = 512
    zero_expert_num: int = 256  # identity ("zero-computation") experts
    n_shared_experts: int = 0
    moe_topk: int = 12
    routed_scaling_factor: float = 6.0
    router_type: str = "softmax"  # "softmax" (LongCat) or "sigmoid" (GLM / DeepSeek-V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    mlp_layer_types: list[str] | None = None  # GLM: "dense" / "sparse" per layer
    # misc
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # MTP layers stored in the checkpoint (not used for decoding)

    # ---------------------------------------------------------------- derived sizes
    @property
    def is_longcat(self) -> bool:
        return self.model_type == LONGCAT

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_attn_sublayers(self) -> int:
        """Attention sublayers = KV-cache layers (LongCat: 2 per layer)."""
        return self.num_layers * (2 if self.is_longcat else 1)

    @property
    def num_router_experts(self) -> int:
        """Width of the router: routed + zero experts."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def q_scale(self) -> float:
        if not (self.is_longcat and self.mla_scale_q_lora and self.q_lora_rank):
            return 1.0
        return (self.hidden_size / self.q_lora_rank) ** 0.5

    @property
    def kv_scale(self) -> float:
        if not (self.is_longcat and self.mla_scale_kv_lora):
            return 1.0
        return (self.hidden_size / self.kv_lora_rank) ** 0.5

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    @property
    def layer_is_moe(self) -> list[bool]:
        if self.is_longcat:
            return [True] * self.num_layers
        types = self.mlp_layer_types or (["dense"] + ["sparse"] * (self.num_layers - 1))
        return [t == "sparse" for t in types]

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Latent cache: (kv_lora_rank + qk_rope_head_dim) values per token per attention sublayer."""
        return self.num_attn_sublayers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_value

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- checks
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Type- and range-check every field, then the sizes, then how the fields fit together.

        Each problem is one `ConfigError` naming the field. The size limits (MAX_LAYERS, MAX_PARAMS) are checked
        from arithmetic alone, before anything is built: a 10^9-layer config fails here in microseconds.
        """
        def bad(msg):
            raise ConfigError(msg)

        if self.model_type not in MODEL_TYPES:
            bad(f"unknown model_type {self.model_type!r}: expected one of {MODEL_TYPES}")
        for name, kind, lo in _FIELD_SPECS:
            v = getattr(self, name)
            if v is None and name in _NULLABLE:
                continue
            if kind is bool:
                if not isinstance(v, bool):
                    bad(f"{name} must be true or false, got {v!r}")
            elif kind is int:
                if not isinstance(v, int) or isinstance(v, bool):
                    bad(f"{name} must be an integer, got {v!r}")
                if v < lo:
                    bad(f"{name} must be >= {lo}, got {v}")
                if v > MAX_DIM:
                    bad(f"{name}={v} is larger than {MAX_DIM} (not a model this package can build)")
            elif kind is float:
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    bad(f"{name} must be a finite number, got {v!r}")
                if not v > lo:
                    bad(f"{name} must be > {lo}, got {v}")
            elif kind is str:
                if not isinstance(v, str):
                    bad(f"{name} must be a string, got {v!r}")
        if self.num_layers > MAX_LAYERS:
            bad(f"num_layers={self.num_layers} is more than {MAX_LAYERS} (refused before building anything)")
        if not self.rms_norm_eps < 1:
            bad(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size):
                bad(f"{name} must be null or an integer in [0, vocab_size={self.vocab_size}), got {v!r}")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size for v in eos_list):
            bad(f"eos_token_id must be null, an integer or a list of integers in [0, vocab_size={self.vocab_size}), "
                f"got {eos!r}")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even for rotary pairs, got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            bad(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', as both real checkpoints use)")
        if self.router_type not in ("softmax", "sigmoid"):
            bad(f"router_type must be 'softmax' or 'sigmoid', got {self.router_type!r}")
        if self.mlp_layer_types is not None:
            if not isinstance(self.mlp_layer_types, list) or \
                    not all(t in ("dense", "sparse") for t in self.mlp_layer_types):
                bad(f"mlp_layer_types must be a list of 'dense' / 'sparse', got {self.mlp_layer_types!r}"[:200])
            if len(self.mlp_layer_types) != self.num_layers:
                bad(f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {self.num_layers} layers")
        n = estimate_params(self)
        if n > MAX_PARAMS:
            bad(f"this config describes about {n / 1e12:.1f} trillion parameters, more than the {MAX_PARAMS / 1e12:g} "
                "trillion this package will allocate (refused before building anything)")
        if any(self.layer_is_moe):
            if self.moe_topk > self.num_router_experts:
                bad(f"moe_topk={self.moe_topk} is larger than the expert pool "
                    f"({self.n_routed_experts} routed + {self.zero_expert_num} zero experts)")
            if self.n_routed_experts == 0:
                bad("a MoE layer needs n_routed_experts > 0")
        if self.num_router_experts % self.n_group:
            bad(f"n_group={self.n_group} must divide the {self.num_router_experts} experts")
        if not 1 <= self.topk_group <= self.n_group:
            bad(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.num_router_experts // self.n_group < 2:
            bad("group-limited routing scores a group by its top-2 experts: each group needs >= 2 experts")
        if self.n_group > 1 and self.moe_topk > self.topk_group * (self.num_router_experts // self.n_group):
            bad(f"moe_topk={self.moe_topk} exceeds the experts in the {self.topk_group} selected groups")
        if self.is_longcat and self.router_type != "softmax":
            bad("LongCat-Flash uses the softmax router")
        if not self.is_longcat and self.zero_expert_num:
            bad("zero-computation experts are a LongCat-Flash feature (zero_expert_num must be 0)")

    def to_dict(self) -> dict:
        """The config in transformers' field names, as `config.json` holds it (see `config_to_dict`)."""
        return config_to_dict(self)


# Limits checked before anything is allocated (issue 16): LongCat-Flash is 0.56 T parameters and 28 layers.
MAX_LAYERS = 10_000
MAX_PARAMS = 5e12
MAX_DIM = 2**31 - 1
# (field, type, lower bound): ints are >= bound, floats are finite and > bound. Checked in this order.
_FIELD_SPECS = [
    ("vocab_size", int, 1), ("hidden_size", int, 1), ("num_layers", int, 1), ("num_attention_heads", int, 1),
    ("q_lora_rank", int, 1), ("kv_lora_rank", int, 1), ("qk_nope_head_dim", int, 1), ("qk_rope_head_dim", int, 2),
    ("v_head_dim", int, 1), ("mla_scale_q_lora", bool, None), ("mla_scale_kv_lora", bool, None),
    ("attention_bias", bool, None), ("rope_theta", float, 0), ("rope_interleave", bool, None),
    ("max_position_embeddings", int, 1), ("ffn_hidden_size", int, 1), ("expert_ffn_hidden_size", int, 1),
    ("hidden_act", str, None), ("n_routed_experts", int, 0), ("zero_expert_num", int, 0),
    ("n_shared_experts", int, 0), ("moe_topk", int, 1), ("routed_scaling_factor", float, 0),
    ("router_type", str, None), ("n_group", int, 1), ("topk_group", int, 1), ("norm_topk_prob", bool, None),
    ("rms_norm_eps", float, 0), ("tie_word_embeddings", bool, None), ("num_nextn_predict_layers", int, 0),
]
_NULLABLE = {"q_lora_rank"}


def estimate_params(cfg: ModelConfig) -> int:
    """Parameter count from the sizes alone (no model is built): used to refuse absurd configs early."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    q = (H * cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim) if cfg.q_lora_rank else H * nh * cfg.qk_head_dim
    attn = q + H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (
        cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * H
    dense, expert = 3 * H * cfg.ffn_hidden_size, 3 * H * cfg.expert_ffn_hidden_size
    moe = cfg.n_routed_experts * expert + cfg.n_shared_experts * expert + H * cfg.num_router_experts
    if cfg.is_longcat:
        layers = cfg.num_layers * (2 * attn + 2 * dense + moe)
    else:
        n_moe = sum(1 for t in (cfg.mlp_layer_types or ["sparse"] * cfg.num_layers) if t == "sparse")
        layers = cfg.num_layers * attn + n_moe * moe + (cfg.num_layers - n_moe) * dense
    return layers + 2 * cfg.vocab_size * H


# ----------------------------------------------------------------------------------------- reading config.json
# Fields transformers (or the original remote code) writes that do not change the inference math.
_IGNORED = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
    "output_attentions", "use_cache", "initializer_range", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "auto_map", "pretraining_tp", "tokenizer_class", "attention_method",
    "router_dtype", "rounter_params_dtype", "quantization_config", "disable_quant_module", "topk_method",
    "scoring_func", "aux_loss_alpha", "seq_aux", "num_key_value_heads", "generation_config", "use_bfloat16",
    "ep_size", "moe_layer_freq", "first_k_dense_replace", "first_k_dense", "tie_word_embedding",
    "add_cross_attention", "tf_legacy_loss", "pruned_heads", "torchscript", "finetuning_task",
    "prefix", "decoder_start_token_id", "sep_token_id", "task_specific_params", "is_decoder",
    "cross_attention_hidden_size", "max_length", "use_flash_attn", "norm_eps",
    # engines' LongCat config classes (params_dtype: the weights' dtype; nextn_use_scmoe: only the MTP block)
    "params_dtype", "nextn_use_scmoe",
}
# Keys whose value changes the math: accepted only with the value this package implements.
_MUST_BE = {"topk_method": {None, "noaux_tc"}, "moe_layer_freq": {None, 1}}
_SCORING = {"longcat_flash": {None, "softmax"}, "glm4_moe_lite": {None, "sigmoid"}}
MAX_CONFIG_BYTES = 16 * 2**20


def config_from_dict(d: dict) -> ModelConfig:
    """Build a ModelConfig from a transformers / original-LongCat config dict."""
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    try:
        return _config_from_dict(dict(d))
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # a wrong type deep in a conversion
        raise ConfigError(f"config.json has a field of the wrong type ({type(e).__name__}: {e})") from None


def _int_field(d: dict, key: str) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {v!r}")
    return v


def _config_from_dict(d: dict) -> ModelConfig:
    model_type = d.pop("model_type", None)
    if model_type is None:
        # The published LongCat-Flash-Chat config.json has model_type "longcat_flash"; copies that dropped it are
        # recognised by LongCat's own fields.
        if "zero_expert_num" in d or "expert_ffn_hidden_size" in d or "ffn_hidden_size" in d:
            model_type = LONGCAT
        else:
            raise ConfigError("config.json has no model_type and does not look like LongCat-Flash "
                              f"(expected one of {MODEL_TYPES})")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type {model_type!r}: longcat_ref builds {MODEL_TYPES}")

    out: dict = {"model_type": model_type}
    used = {"model_type"}
    for key, allowed in {**_MUST_BE, "scoring_func": _SCORING[model_type]}.items():
        if key in d and d[key] not in allowed:
            raise ConfigError(f"{key}={d[key]!r} is not supported for {model_type} "
                              f"(only {sorted(a for a in allowed if a is not None)})")

    def take(src, dst=None, conv=lambda v: v):
        if src in d:
            out[dst or src] = conv(d[src])
            used.add(src)

    # rope: rope_parameters (transformers 5), or the legacy rope_theta / rope_scaling keys
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(d.get(key) or {}, dict):
            raise ConfigError(f"{key} must be an object or null, got {d[key]!r}")
    rp = d.get("rope_parameters") or {}
    used.add("rope_parameters")
    if "rope_theta" in d:
        rp = {**rp, "rope_theta": d["rope_theta"]}
        used.add("rope_theta")
    if d.get("rope_scaling"):
        rp = {**rp, **d["rope_scaling"]}
    used.add("rope_scaling")
    if "partial_rotary_factor" in d:  # GLM-4.7-Flash's config.json has it at the top level
        rp = {**rp, "partial_rotary_factor": d["partial_rotary_factor"]}
        used.add("partial_rotary_factor")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default' rotary embeddings)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={rp['partial_rotary_factor']!r} is not supported (only 1.0: the "
                          "rotary part is qk_rope_head_dim, set that instead)")
    out["rope_theta"] = rp.get("rope_theta", 1e7 if model_type == LONGCAT else 1e4)

    common = ["vocab_size", "hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "attention_bias", "max_position_embeddings",
              "hidden_act", "n_routed_experts", "routed_scaling_factor", "rms_norm_eps", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id", "norm_topk_prob", "num_nextn_predict_layers",
              "n_group", "topk_group", "rope_interleave", "mla_scale_q_lora", "mla_scale_kv_lora",
              "n_shared_experts", "mlp_layer_types"]
    for k in common:
        take(k)
    if model_type == LONGCAT:
        take("num_layers")
        if "num_hidden_layers" in d:  # transformers: 2 sublayers per layer
            out["num_layers"] = _int_field(d, "num_hidden_layers") // 2
            used.add("num_hidden_layers")
        if "num_layers" in d:
            out["num_layers"] = d["num_layers"]
        take("ffn_hidden_size")
        take("intermediate_size", "ffn_hidden_size")
        take("expert_ffn_hidden_size")
        take("moe_intermediate_size", "expert_ffn_hidden_size")
        take("zero_expert_num", conv=lambda v: v or 0)
        take("moe_topk")
        take("num_experts_per_tok", "moe_topk")
        take("num_local_experts", "n_routed_experts")
        take("num_nextn_layers", "num_nextn_predict_layers")  # the engines' name for it
        if "zero_expert_type" in d:
            used.add("zero_expert_type")
            if d["zero_expert_type"] not in (None, "identity"):
                raise ConfigError(f"zero_expert_type {d['zero_expert_type']!r} is not supported (only 'identity')")
        if "router_bias" in d:
            used.add("router_bias")  # transformers creates classifier.bias but never uses it; so do we (ignored)
        if d.get("norm_topk_prob"):
            raise ConfigError("norm_topk_prob=true is not supported for LongCat-Flash (the reference never "
                              "renormalizes its top-k weights)")
        out.setdefault("zero_expert_num", 0)
        out["router_type"] = "softmax"
        out.setdefault("qk_rope_head_dim", d.get("head_dim", 64))
        if "head_dim" in d:
            used.add("head_dim")
            if d["head_dim"] != out["qk_rope_head_dim"]:
                raise ConfigError(f"head_dim={d['head_dim']} must equal qk_rope_head_dim={out['qk_rope_head_dim']} "
                                  "(LongCat uses head_dim as the rotary dimension)")
    else:
        take("num_hidden_layers", "num_layers")
        take("intermediate_size", "ffn_hidden_size")
        take("moe_intermediate_size", "expert_ffn_hidden_size")
        take("num_experts_per_tok", "moe_topk")
        take("num_local_experts", "n_routed_experts")
        out.update(zero_expert_num=0, router_type="sigmoid", mla_scale_q_lora=False, mla_scale_kv_lora=False)
        out.setdefault("n_shared_experts", 0)
        out.setdefault("norm_topk_prob", False)
        out.setdefault("rope_interleave", True)
        out.setdefault("bos_token_id", None)
        out.setdefault("eos_token_id", None)
        if "head_dim" in d:
            used.add("head_dim")
            if d["head_dim"] != out.get("qk_rope_head_dim", 64):
                raise ConfigError(f"head_dim={d['head_dim']} must equal qk_rope_head_dim")
        if "first_k_dense_replace" in d:
            _int_field(d, "first_k_dense_replace")
            if not isinstance(out.get("num_layers"), int):
                raise ConfigError(f"num_hidden_layers must be an integer, got {out.get('num_layers')!r}")
        if out.get("mlp_layer_types") is None and "first_k_dense_replace" in d:
            k = d["first_k_dense_replace"]
            out["mlp_layer_types"] = ["dense"] * k + ["sparse"] * (out["num_layers"] - k)
        if "first_k_dense_replace" in d and out.get("mlp_layer_types") is not None:
            k = d["first_k_dense_replace"]
            if out["mlp_layer_types"] != ["dense"] * k + ["sparse"] * (out["num_layers"] - k):
                raise ConfigError("first_k_dense_replace and mlp_layer_types disagree")

    if "qk_head_dim" in d:
        used.add("qk_head_dim")
        exp = out.get("qk_nope_head_dim", 128) + out.get("qk_rope_head_dim", 64)
        if d["qk_head_dim"] not in (None, exp):
            raise ConfigError(f"qk_head_dim={d['qk_head_dim']} does not equal qk_nope_head_dim + qk_rope_head_dim = {exp}")
    if d.get("num_key_value_heads") not in (None, out.get("num_attention_heads", 64)):
        raise ConfigError("MLA has one latent for all heads: num_key_value_heads must equal num_attention_heads")

    unknown = sorted(set(d) - used - _IGNORED - set(_MUST_BE) - {"scoring_func"})
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown} for {model_type}: longcat_ref does not know what "
                          f"{'they change' if len(unknown) > 1 else 'it changes'}; if it does not affect inference, "
                          "remove it from config.json (or add it to _IGNORED in longcat_ref/model/config.py)")
    return ModelConfig(**out)


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a ModelConfig from a checkpoint directory or a config.json file."""
    return config_from_dict(read_json(path))


def read_json(path: str | os.PathLike, limit: int = MAX_CONFIG_BYTES):
    """A small JSON file (a checkpoint directory's config.json, or the file itself) -> its value.

    Only a regular file up to `limit` bytes is read (a FIFO or /dev/stdin would block forever); text that is not
    UTF-8, not JSON, or nested too deep for Python's parser is a one-line ConfigError.
    """
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {file}")
    import stat

    st = os.stat(file)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{file} is not a regular file")
    if st.st_size > limit:
        raise ConfigError(f"{file} is larger than {limit} bytes: not a config file")
    try:
        with open(file, "rb") as f:
            return json.loads(f.read(limit + 1).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{file} is nested too deeply to be a config file") from None


def config_to_dict(cfg: ModelConfig) -> dict:
    """Write a config in transformers' field names (what `save_pretrained` would write)."""
    base = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                attention_bias=cfg.attention_bias, max_position_embeddings=cfg.max_position_embeddings,
                hidden_act=cfg.hidden_act, n_routed_experts=cfg.n_routed_experts,
                routed_scaling_factor=cfg.routed_scaling_factor, rms_norm_eps=cfg.rms_norm_eps,
                tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"}, model_type=cfg.model_type)
    if cfg.is_longcat:
        base.update(num_layers=cfg.num_layers, ffn_hidden_size=cfg.ffn_hidden_size,
                    expert_ffn_hidden_size=cfg.expert_ffn_hidden_size, zero_expert_num=cfg.zero_expert_num,
                    moe_topk=cfg.moe_topk, head_dim=cfg.qk_rope_head_dim)
    else:
        base.update(num_hidden_layers=cfg.num_layers, intermediate_size=cfg.ffn_hidden_size,
                    moe_intermediate_size=cfg.expert_ffn_hidden_size, num_experts_per_tok=cfg.moe_topk,
                    n_shared_experts=cfg.n_shared_experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
                    norm_topk_prob=cfg.norm_topk_prob, rope_interleave=cfg.rope_interleave,
                    mlp_layer_types=["sparse" if m else "dense" for m in cfg.layer_is_moe])
    if cfg.num_nextn_predict_layers:
        base["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers
    if cfg.is_longcat and not (cfg.mla_scale_q_lora and cfg.mla_scale_kv_lora):
        base.update(mla_scale_q_lora=cfg.mla_scale_q_lora, mla_scale_kv_lora=cfg.mla_scale_kv_lora)
    return base


# ----------------------------------------------------------------------------------------- named configs
def longcat_flash_chat() -> ModelConfig:
    """LongCat-Flash-Chat: 28 layers, 6144 hidden, 512 routed + 256 zero experts, top-12."""
    return ModelConfig()


def glm_4_7_flash() -> ModelConfig:
    """GLM-4.7-Flash (30B-A3B): 47 layers, 2048 hidden, 64 experts top-4 + 1 shared, first layer dense."""
    return ModelConfig(model_type=GLM, vocab_size=154880, hidden_size=2048, num_layers=47, num_attention_heads=20,
                       q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
                       mla_scale_q_lora=False, mla_scale_kv_lora=False, rope_theta=1e6, rope_interleave=True,
                       max_position_embeddings=202752, ffn_hidden_size=10240, expert_ffn_hidden_size=1536,
                       n_routed_experts=64, zero_expert_num=0, n_shared_experts=1, moe_topk=4,
                       routed_scaling_factor=1.8, router_type="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True,
                       mlp_layer_types=["dense"] + ["sparse"] * 46, bos_token_id=None,
                       eos_token_id=[154820, 154827, 154829], pad_token_id=154820, num_nextn_predict_layers=1)


def tiny_longcat(**kw) -> ModelConfig:
    """A tiny LongCat-Flash for tests, notebooks and the demo (sizes divide by 16 for the parallel tests)."""
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=16, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, ffn_hidden_size=128,
                expert_ffn_hidden_size=32, n_routed_experts=16, zero_expert_num=8, moe_topk=4,
                routed_scaling_factor=2.0, rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=3)
    base.update(kw)
    return ModelConfig(**base)


def tiny_glm(**kw) -> ModelConfig:
    """A tiny GLM-4.7-Flash-like config."""
    base = dict(model_type=GLM, vocab_size=512, hidden_size=64, num_layers=3, num_attention_heads=4, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=16, mla_scale_q_lora=False,
                mla_scale_kv_lora=False, rope_theta=1e6, max_position_embeddings=512, ffn_hidden_size=96,
                expert_ffn_hidden_size=24, n_routed_experts=8, zero_expert_num=0, n_shared_experts=1, moe_topk=2,
                routed_scaling_factor=1.8, router_type="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True,
                mlp_layer_types=["dense", "sparse", "sparse"], bos_token_id=None, eos_token_id=[2], pad_token_id=0)
    base.update(kw)
    return ModelConfig(**base)
