"""Write the torchtune adapters of tests/data/torchtune/ with the real torchtune, and their truth.

Each adapter is made the way ``recipes/lora_finetune_single_device.py`` makes one: a tiny
``lora_llama3`` built from its component builder (no download), base weights as initialised,
DoRA magnitudes set by ``initialize_dora_magnitude()`` as ``_setup_model`` does; the adapter
parameters are then perturbed with a fixed seed in place of training (``lora_b`` starts at zero),
and ``FullModelTorchTuneCheckpointer.save_checkpoint(..., adapter_only=True)`` writes
``epoch_0/adapter_model.pt`` (``torch.save(get_adapter_state_dict(model.state_dict()))``).
Where alpha lives:

- ``lora/``: the recipe config, written by ``training.metric_logging.save_config`` to
  ``lora/torchtune_config.yaml`` (``model.lora_alpha``), above ``epoch_0/``;
- ``dora/``: ``epoch_0/adapter_config.json`` as ``FullModelHFCheckpointer`` writes it
  (``convert_weights.tune_to_peft_adapter_config`` of the recipe's adapter config, dumped with
  ``json.dump``), without the PEFT weights that checkpointer would add beside it.

``truth.npz`` holds, per adapted module, torchtune's own ``get_merged_lora_ckpt`` (in float64: the
float32 parameters upcast exactly) minus the base weight, ``<module>.delta``; for DoRA also the
base weight, ``<module>.base`` (the merged weight is base + delta).

Run where torchtune imports (torchtune 0.6.1 needs torchao; 0.11.0 works beside torch 2.13)::

    OMP_NUM_THREADS=1 python tests/data/make_torchtune_fixtures.py

tests/test_fmt_torchtune.py imports :func:`make` to write the same adapters into a temporary
directory when torchtune is importable, and reads the committed copies otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torchtune.models import convert_weights
from torchtune.models.llama3._component_builders import lora_llama3
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt
from torchtune.training import FullModelTorchTuneCheckpointer
from torchtune.training.metric_logging import save_config

OUT = Path(__file__).resolve().parent / "torchtune"

MODEL = dict(
    lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
    apply_lora_to_mlp=True,
    apply_lora_to_output=True,
    vocab_size=10,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    embed_dim=8,
    max_seq_len=16,
    intermediate_dim=12,
    lora_rank=2,
)
# name -> (use_dora, lora_alpha, seed, overrides of MODEL)
KINDS = {
    "lora": (False, 3.0, 0, {}),
    "dora": (True, 5.0, 1, {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False}),
}


def _targets(cfg: dict) -> list[str]:
    """The recipe's ``get_lora_module_names``."""
    mlp = ["w1", "w2", "w3"] if cfg["apply_lora_to_mlp"] else []
    return [*cfg["lora_attn_modules"], *mlp, *(["output"] if cfg["apply_lora_to_output"] else [])]


def make(kind: str, out: Path) -> None:
    """Write ``epoch_0/adapter_model.pt``, where alpha lives, and ``truth.npz`` into ``out``."""
    use_dora, alpha, seed, overrides = KINDS[kind]
    cfg = {**MODEL, **overrides}
    torch.manual_seed(seed)
    model = lora_llama3(**cfg, lora_alpha=alpha, use_dora=use_dora)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    if use_dora:  # == lora_finetune_single_device._setup_model
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()

    # stand-in for training: perturb the adapter parameters with a fixed seed
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))

    # == FullModelTorchTuneCheckpointer.save_checkpoint (adapter_only=True)
    ckpt_dir = out / "_base"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(base, ckpt_dir / "model.pt")
    checkpointer = FullModelTorchTuneCheckpointer(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=["model.pt"],
        model_type="LLAMA3",
        output_dir=str(out),
    )
    adapter_config = {
        "r": cfg["lora_rank"],
        "lora_alpha": alpha,
        "target_modules": _targets(cfg),
        "peft_type": "LORA",
    }
    checkpointer.save_checkpoint(
        {"adapter": get_adapter_state_dict(model.state_dict()), "adapter_config": adapter_config},
        epoch=0,
        adapter_only=True,
    )
    (ckpt_dir / "model.pt").unlink()
    ckpt_dir.rmdir()

    if use_dora:  # == FullModelHFCheckpointer: the PEFT adapter_config.json
        peft_config = convert_weights.tune_to_peft_adapter_config(dict(adapter_config))
        with open(out / "epoch_0" / "adapter_config.json", "w") as f:
            json.dump(peft_config, f)
    else:  # == metric_logging.save_config: {output_dir}/torchtune_config.yaml
        model_cfg = {"_component_": "torchtune.models.llama3.lora_llama3", **cfg}
        model_cfg["lora_alpha"] = alpha
        save_config(OmegaConf.create({"output_dir": str(out), "model": model_cfg}))
        # the recipe config names its own output_dir; keep the committed copy free of tmp paths
        path = out / "torchtune_config.yaml"
        path.write_text(path.read_text().replace(str(out), kind))

    # truth: torchtune's own merge, in float64, minus the base
    state = {k: v.double() for k, v in model.state_dict().items()}
    merged = get_merged_lora_ckpt(dict(state), rank=cfg["lora_rank"], alpha=alpha)
    truth = {}
    for key in state:
        if key.endswith(".lora_a.weight"):
            module = key.removesuffix(".lora_a.weight")
            W = base[f"{module}.weight"].double()
            truth[f"{module}.delta"] = (merged[f"{module}.weight"] - W).numpy()
            if use_dora:
                truth[f"{module}.base"] = W.numpy()
    np.savez_compressed(out / "truth.npz", **truth)


def main() -> None:
    for kind in KINDS:
        make(kind, OUT / kind)
        files = sorted(str(p.relative_to(OUT / kind)) for p in (OUT / kind).rglob("*"))
        print(kind, files, file=sys.stderr)


if __name__ == "__main__":
    main()
