"""Phi-3: a Llama whose checkpoints fuse q/k/v into one `qkv_proj` and gate/up into `gate_up_proj`.

Only the declarations differ from llama.py: the fused matrices are kept fused (one matmul each) and
`layers.project_qkv` / `layers.gated_mlp` split their outputs, so the forward pass is Llama's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxinfer.models import llama
from jaxinfer.models.family import WeightSpec

ARCHITECTURES = ("Phi3ForCausalLM",)


@dataclass(frozen=True, kw_only=True)
class Phi3Config(llama.DecoderConfig):
    """Llama's config; `sliding_window` applies to every layer (Phi-3-mini-4k uses 2047)."""

    @classmethod
    def from_hf(cls, hf_config) -> Phi3Config:
        cfg = super().from_hf(hf_config)
        rope = dict(cfg.rope_parameters)
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            # Phi-3's "su"/"yarn" configs are renamed "longrope" by transformers.
            raise ValueError(
                f"Phi3ForCausalLM with rope_type {rope_type!r} (the 128k-context variants) is not "
                "supported; only the default rope (e.g. Phi-3-mini-4k)"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(
                f"Phi3ForCausalLM with partial_rotary_factor={rope['partial_rotary_factor']} "
                "is not supported; only 1.0"
            )
        return dataclasses.replace(cfg, sliding_window=getattr(hf_config, "sliding_window", None))


DecoderConfig = Phi3Config  # the name the loader looks up


def declare_weights(cfg: Phi3Config) -> dict[str, WeightSpec]:
    """Llama's declarations with q/k/v and gate/up each replaced by their fused matrix."""
    e, f = cfg.hidden_size, cfg.intermediate_size
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    fused = {"q", "k", "v", "gate", "up"}
    specs = {
        path: spec
        for path, spec in llama.declare_weights(cfg).items()
        if path.rsplit(".", 1)[-1] not in fused
    }
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}"
        specs[f"layers.{i}.qkv"] = WeightSpec(
            f"{hf}.self_attn.qkv_proj.weight", (e, qkv_out), ("embed", "qkv_heads"), True
        )
        specs[f"layers.{i}.gate_up"] = WeightSpec(
            f"{hf}.mlp.gate_up_proj.weight", (e, 2 * f), ("embed", "mlp"), True
        )
    return specs


EMBED_PARAMS = llama.EMBED_PARAMS
embed = llama.embed
decoder_layer = llama.decoder_layer
logits = llama.logits
