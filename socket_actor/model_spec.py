"""What a model is: read from a Hugging Face style `config.json`, with parameter and byte counts.

Three decoder families cover the presets: `llama` (Llama 2/3, Mistral: RMSNorm, RoPE, gated SiLU
MLP, GQA), `falcon` (LayerNorm, RoPE, parallel attention and MLP, multi-group attention) and
`bloom` (LayerNorm, ALiBi, biases, GELU MLP, an embedding LayerNorm). Parameter counts follow
the module structure of each family, so llama-2-7b comes out at 6.74e9 parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from importlib import resources
from pathlib import Path
from typing import Any

from rdu.base import Fields, UserError, read_user_text

__all__ = ["ModelSpec", "load_model", "model_presets"]

_FAMILIES = {"llama": "llama", "mistral": "llama", "falcon": "falcon", "RefinedWeb": "falcon",
             "RefinedWebModel": "falcon", "bloom": "bloom"}

# Upper bounds far beyond any published model, so that a typo (1e30 layers) is one line, not a
# machine that fills its memory building the operator graph.
_LIMITS = {"hidden_size": 1 << 20, "num_layers": 4096, "num_heads": 1 << 16, "num_kv_heads": 1 << 16,
           "intermediate_size": 1 << 22, "vocab_size": 1 << 24, "positions": 1 << 28}

# Hugging Face configs name the same quantity differently per family.
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embed", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a decoder-only transformer; weights in `dtype_bytes` each."""

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    gated_mlp: bool
    norm: str                  # "rms" (weight) or "layer" (weight + bias)
    position: str              # "rope" or "alibi"
    parallel_attention: bool   # attention and MLP read the same input and share one all-reduce
    norms_per_layer: int
    linear_bias: bool
    tie_embeddings: bool
    embedding_norm: bool
    sliding_window: int | None
    max_position_embeddings: int | None
    dtype_bytes: int = 2

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str, origin: str, dtype_bytes: int = 2) -> "ModelSpec":
        fields = Fields(config, origin)
        model_type = fields.string("model_type")
        if model_type not in _FAMILIES:
            fields.fail(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))}",
                        "model_type")
        family = _FAMILIES[model_type]

        def pick(quantity: str, default: Any = None) -> int:
            for key in _ALIASES[quantity]:
                if key in config and config[key] is not None:
                    return fields.integer(key, maximum=_LIMITS[quantity])
            if default is not None:
                return default
            fields.fail(f"missing field (any of: {', '.join(_ALIASES[quantity])})", _ALIASES[quantity][0])

        hidden = pick("hidden_size")
        heads = pick("num_heads")
        if family == "falcon" and not config.get("new_decoder_architecture", False) and config.get("multi_query", True):
            kv_default = 1
        else:
            kv_default = heads
        kv_heads = pick("num_kv_heads", kv_default)
        if hidden % heads:
            fields.fail(f"hidden size {hidden} is not a multiple of the {heads} attention heads", "hidden_size")
        if heads % kv_heads:
            fields.fail(f"{heads} attention heads are not a multiple of {kv_heads} key/value heads",
                        _ALIASES["num_kv_heads"][0])
        intermediate = pick("intermediate_size", 4 * hidden if family != "llama" else None)
        window = config.get("sliding_window")
        if window is not None:
            window = fields.integer("sliding_window", maximum=_LIMITS["positions"])
        max_pos = config.get("max_position_embeddings")
        if max_pos is not None:
            max_pos = fields.integer("max_position_embeddings", maximum=_LIMITS["positions"])
        return cls(
            name=name,
            family=family,
            vocab_size=fields.integer("vocab_size", maximum=_LIMITS["vocab_size"]),
            hidden_size=hidden,
            num_layers=pick("num_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=intermediate,
            gated_mlp=family == "llama",
            norm="rms" if family == "llama" else "layer",
            position="alibi" if family == "bloom" or config.get("alibi", False) else "rope",
            parallel_attention=family == "falcon" and bool(config.get("parallel_attn", True)),
            norms_per_layer=2 if family != "falcon" or config.get("new_decoder_architecture", False) else 1,
            linear_bias=family == "bloom" or bool(config.get("bias", False)),
            tie_embeddings=bool(config.get("tie_word_embeddings", family != "llama")),
            embedding_norm=family == "bloom",
            sliding_window=window,
            max_position_embeddings=max_pos,
            dtype_bytes=dtype_bytes,
        )

    # -- derived sizes --------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def norm_params(self) -> int:
        return self.hidden_size * (1 if self.norm == "rms" else 2)

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, d = self.hidden_size, self.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * d
        attention = h * qkv_out + self.num_heads * d * h
        mlp_mats = 3 if self.gated_mlp else 2
        mlp = mlp_mats * h * self.intermediate_size
        bias = 0
        if self.linear_bias:
            bias = qkv_out + h + (mlp_mats - 1) * self.intermediate_size + h
        return attention + mlp + bias + self.norms_per_layer * self.norm_params

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def params(self) -> int:
        """All parameters: embeddings, layers, final norm and (untied) LM head."""
        total = self.embedding_params() + self.num_layers * self.layer_params() + self.norm_params
        if self.embedding_norm:
            total += self.norm_params
        if not self.tie_embeddings:
            total += self.embedding_params()
        return total

    def weight_bytes(self) -> int:
        return self.params() * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """Key and value cache bytes one token adds across all layers (whole model, unsharded)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_presets() -> list[str]:
    """Names of the shipped model presets."""
    folder = resources.files("rdu.socket_actor") / "models"
    return sorted(entry.name.removesuffix(".json") for entry in folder.iterdir() if entry.name.endswith(".json"))


def load_model(name_or_path: str, dtype_bytes: int = 2) -> ModelSpec:
    """A model preset by name, or any Hugging Face style `config.json` by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"{name_or_path}: no such model config file")
        text, origin, name = read_user_text(path, "model config file"), str(path), path.parent.name or path.stem
        if path.name != "config.json":
            name = path.stem
    else:
        if name_or_path not in model_presets():
            raise UserError(f"unknown model {name_or_path!r}; presets: {', '.join(model_presets())} "
                            f"(or a path to a config.json)")
        resource = resources.files("rdu.socket_actor") / "models" / f"{name_or_path}.json"
        text, origin, name = resource.read_text(encoding="utf-8"), f"model preset {name_or_path}", name_or_path
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{origin}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    return ModelSpec.from_hf_config(config, name, origin, dtype_bytes)
