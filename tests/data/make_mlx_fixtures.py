"""Write the mlx-lm adapters of tests/data/mlx/ with the real mlx-lm, and their truth.

Each adapter is made the way ``mlx_lm.lora.train_model`` and ``mlx_lm.tuner.trainer.train`` make
one: a tiny model built from ``ModelArgs`` (no download), ``model.freeze()``, then
``linear_to_lora_layers`` (or, for a full fine-tune, ``unfreeze`` of the last layers); the
trainable leaves are perturbed with a fixed seed in place of training (``lora_b`` starts at zero);
``mx.save_safetensors(adapters.safetensors, dict(tree_flatten(model.trainable_parameters())))``
and ``save_config(args, adapter_config.json)``. ``truth.npz`` holds, per adapted module, mlx-lm's
own ``fuse()`` minus the base weight, computed after casting the model to float64 (the float32
factors upcast exactly), in the base weight's layout: ``(d_out, d_in)``, ``(vocab, dims)`` for an
embedding, ``(E, d_out, d_in)`` for a ``LoRASwitchLinear``; for DoRA also the base weight (the
fused weight is base + delta). Each adapter is loaded back with
``mlx_lm.tuner.utils.load_adapters`` as a check.

Run (mlx[cpu] and mlx-lm installed; lorascope not needed)::

    OMP_NUM_THREADS=1 python tests/data/make_mlx_fixtures.py

tests/test_fmt_mlx.py imports :func:`make` to write the same adapters into a temporary directory
when mlx and mlx-lm are importable, and reads the committed copies otherwise.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.lora import CONFIG_DEFAULTS
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
from mlx_lm.utils import save_config

OUT = Path(__file__).resolve().parent / "mlx"

LLAMA = dict(
    model_type="llama",
    hidden_size=8,
    num_hidden_layers=2,
    intermediate_size=12,
    num_attention_heads=2,
    num_key_value_heads=1,
    rms_norm_eps=1e-5,
    vocab_size=10,
    tie_word_embeddings=False,
)
MIXTRAL = dict(
    model_type="mixtral",
    hidden_size=8,
    num_hidden_layers=2,
    intermediate_size=6,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=10,
    num_local_experts=3,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
ALL_LINEAR = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
# name -> (model args, fine_tune_type, num_layers, lora_parameters, seed)
KINDS = {
    "lora": (
        LLAMA,
        "lora",
        1,
        {
            "rank": 2,
            "dropout": 0.0,
            "scale": 2.0,
            "keys": [*ALL_LINEAR, "model.embed_tokens", "lm_head"],
        },
        0,
    ),
    "dora": (
        LLAMA,
        "dora",
        1,
        {
            "rank": 2,
            "dropout": 0.0,
            "scale": 1.5,
            "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "model.embed_tokens"],
        },
        1,
    ),
    "moe": (
        MIXTRAL,
        "lora",
        1,
        {
            "rank": 2,
            "dropout": 0.0,
            "scale": 3.0,
            "keys": [
                "block_sparse_moe.gate",
                "block_sparse_moe.switch_mlp.gate_proj",
                "block_sparse_moe.switch_mlp.up_proj",
                "block_sparse_moe.switch_mlp.down_proj",
            ],
        },
        2,
    ),
    "full": (LLAMA, "full", 1, {"rank": 2, "dropout": 0.0, "scale": 2.0}, 3),
}


def build(margs: dict):
    if margs["model_type"] == "mixtral":
        from mlx_lm.models import mixtral as arch
    else:
        from mlx_lm.models import llama as arch
    model = arch.Model(arch.ModelArgs(**margs))
    mx.eval(model.parameters())
    return model


def _np(a) -> np.ndarray:
    return np.array(a)


def _base_weight(module) -> mx.array:
    inner = getattr(module, "linear", None) or module.embedding
    return inner.weight


def make(kind: str, out: Path) -> None:
    """Write ``adapters.safetensors``, ``adapter_config.json`` and ``truth.npz`` into ``out``."""
    margs, fine_tune_type, num_layers, lora_parameters, seed = KINDS[kind]
    mx.random.seed(seed)
    model = build(margs)
    out.mkdir(parents=True, exist_ok=True)

    # == mlx_lm/lora.py train_model()
    model.freeze()
    lora_parameters = copy.deepcopy(lora_parameters)
    if fine_tune_type == "full":
        for layer in model.layers[-max(num_layers, 0) :]:
            layer.unfreeze()
        lora_parameters = None
    else:
        linear_to_lora_layers(
            model, num_layers, lora_parameters, use_dora=(fine_tune_type == "dora")
        )

    # stand-in for training: perturb every trainable leaf with a fixed seed
    rng = np.random.default_rng(seed)
    update = []
    for name, v in tree_flatten(model.trainable_parameters()):
        noise = rng.standard_normal(v.shape).astype(np.float32)
        if name.endswith(".m"):
            update.append((name, v * mx.array(1 + 0.1 * noise)))
        else:
            update.append((name, v + mx.array(0.3 * noise)))
    model.update(tree_unflatten(update))
    mx.eval(model.parameters())

    # == tuner/trainer.py train(): the final save; lora.py: save_config(vars(args), ...)
    mx.save_safetensors(
        str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    args = copy.deepcopy(CONFIG_DEFAULTS)
    args.update(
        model="tiny-" + margs["model_type"],
        train=True,
        fine_tune_type=fine_tune_type,
        num_layers=num_layers,
        lora_parameters=lora_parameters,
        adapter_path=str(out.name),
        seed=seed,
    )
    save_config(args, out / "adapter_config.json")
    if fine_tune_type == "full":
        return

    # truth: mlx-lm's own fuse() in float64, minus the base weight
    model.set_dtype(mx.float64)
    mx.eval(model.parameters())
    truth = {}
    for name, module in model.named_modules():
        if not hasattr(module, "fuse"):
            continue
        base = _np(_base_weight(module))
        fused = _np(module.fuse(dequantize=True).weight)
        truth[f"{name}.delta"] = fused - base
        if hasattr(module, "m"):  # DoRA: the fused weight is base + delta
            truth[f"{name}.base"] = base
    np.savez_compressed(out / "truth.npz", **truth)

    # the files load back into a fresh model with mlx-lm's own loader
    fresh = build(margs)
    load_adapters(fresh, str(out))
    names = {n for n, m in fresh.named_modules() if hasattr(m, "fuse")}
    assert names == {k.rsplit(".", 1)[0] for k in truth if k.endswith(".delta")}, names


def main() -> None:
    for kind in KINDS:
        make(kind, OUT / kind)
        print(kind, sorted(p.name for p in (OUT / kind).iterdir()), file=sys.stderr)


if __name__ == "__main__":
    main()
