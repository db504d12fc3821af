"""diffusers LoRA files written in the test by the real diffusers on tiny models built from
configs; the truth is diffusers' own loading (``lora_state_dict`` + ``load_lora_into_*`` into a
fresh float64 model, then peft's ``get_delta_weight``, and ``fuse_lora`` for DoRA)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from click.testing import CliRunner
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lorascope.cli import main
from lorascope.errors import FormatError, LoraScopeError, LoraScopeWarning, ShapeError
from lorascope.formats import Probe, load_adapter
from lorascope.formats.layouts import detect
from lorascope.linalg import factored_svdvals
from lorascope.update import merged_weight

RTOL = 1e-10  # σ relative to σ_1, both sides in float64 from the same float32 factors
ADAPTER = "default_0"
WEIGHTS = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------- tiny models


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=4,
    )


def _clip_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_te() -> CLIPTextModel:
    return CLIPTextModel(_clip_config())


def tiny_te2() -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(_clip_config())


def tiny_flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 2, 2),
    )


def tiny_sd3() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )


# ----------------------------------------------------------------------------- helpers


def deltas(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, float]]:
    """peft's ``get_delta_weight`` of every loaded LoRA layer, ``(d_out, d_in)`` (conv
    flattened; an embedding as ``(num_embeddings, embedding_dim)``), with its scaling."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer) and ADAPTER in mod.scaling:
            with torch.no_grad():
                dw = mod.get_delta_weight(ADAPTER).double()
            out[name] = (dw.reshape(dw.shape[0], -1), float(mod.scaling[ADAPTER]))
    return out


def sigma_error(module, truth: torch.Tensor) -> float:
    """max |σ_lorascope − σ_dense| / σ_1 (dense: ``numpy.linalg.svd`` of the truth)."""
    ours = factored_svdvals(module.A, module.B, module.scale).numpy()  # float64
    ref = np.linalg.svd(truth.numpy(), compute_uv=False)
    k = len(ours)
    assert ref[k:].max(initial=0.0) <= 1e-12 * ref[0]  # rank ≤ k
    return float(np.abs(ours - ref[:k]).max() / ref[0])


def assert_sigmas(adapter, truth: dict, rename=lambda n: n) -> float:
    """Every module diffusers loaded is in the adapter with the same σ, and nothing else."""
    assert sorted(m.name for m in adapter) == sorted(rename(n) for n in truth)
    worst = max(sigma_error(adapter[rename(n)], dw) for n, (dw, _s) in truth.items())
    assert worst < RTOL, worst
    return worst


def lora_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, LoraScopeWarning)]


def load(path, **kw):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        adapter = load_adapter(path, **kw)
    return adapter, lora_warnings(record)


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """SD 1.5-style: UNet (attention + 3x3 conv, alpha ≠ r, rank_pattern and alpha_pattern keys
    anchored with ^ so that they match only names *without* the ``unet.`` prefix) and a CLIP
    text encoder (rsLoRA, alpha ≠ r, the token embedding too)."""
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_te()
    ucfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
        init_lora_weights=False,
        rank_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
        alpha_pattern={"to_k": 3, "^up_blocks.1.resnets.0.conv1": 5},
    )
    unet.add_adapter(ucfg)
    tcfg = LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["q_proj", "v_proj", "token_embedding"],
        init_lora_weights=False,
        use_rslora=True,
    )
    inject_adapter_in_model(tcfg, te, adapter_name="default")
    with torch.no_grad():  # peft initializes an embedding's lora_embedding_A to zero
        for mod in te.modules():
            if isinstance(mod, BaseTunerLayer) and "default" in mod.lora_embedding_A:
                mod.lora_embedding_A["default"].normal_()
    out = tmp_path_factory.mktemp("sd")
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(),
        text_encoder_lora_adapter_metadata=tcfg.to_dict(),
    )
    return out / WEIGHTS


def sd_truth(path, metadata=True):
    torch.manual_seed(1)
    unet, te = tiny_unet().double(), tiny_te().double()
    P = StableDiffusionPipeline
    sd, alphas, meta = P.lora_state_dict(str(path), return_lora_metadata=True)
    meta = meta if metadata else None
    P.load_lora_into_unet(sd, alphas, unet, adapter_name=ADAPTER, metadata=meta)
    P.load_lora_into_text_encoder(sd, alphas, te, adapter_name=ADAPTER, metadata=meta)
    truth = {f"unet.{n}": v for n, v in deltas(unet).items()}
    truth.update({f"text_encoder.{n}": v for n, v in deltas(te).items()})
    return truth


@pytest.fixture(scope="module")
def sd3_dora_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_sd3()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False, use_dora=True
    )
    model.add_adapter(cfg)
    _train_magnitudes(model)
    out = tmp_path_factory.mktemp("sd3_dora")
    StableDiffusion3Pipeline.save_lora_weights(
        out,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )
    return out


def _train_magnitudes(model) -> None:
    """Move DoRA's magnitudes off their init ‖W + s·B A‖, as training does."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BaseTunerLayer):
                w = mod.lora_magnitude_vector["default"].weight
                w.mul_(1 + torch.rand(w.shape, generator=gen))


# ----------------------------------------------------------------------------- tests


def test_sd_unet_and_text_encoder_match_diffusers(sd_file):
    adapter, warned = load(sd_file.parent)
    assert adapter.format == "diffusers" and not warned
    truth = sd_truth(sd_file)
    print("\nPEFT-style + metadata (SD):", assert_sigmas(adapter, truth))
    # the per-module numbers peft resolved from the metadata's patterns
    for name, (_dw, scaling) in truth.items():
        assert adapter[name].scale == pytest.approx(scaling, rel=1e-15), name
    q = adapter["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (q.rank, q.scale) == (2, 4.0)  # rank_pattern: r=2, alpha 8
    assert adapter["unet.up_blocks.1.resnets.0.conv1"].scale == 5 / 4  # anchored alpha_pattern
    assert adapter["unet.down_blocks.0.resnets.0.conv1"].scale == 8 / 4
    assert adapter["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k"].scale == 3 / 4
    emb = adapter["text_encoder.embeddings.token_embedding"]
    assert emb.shape == (100, 32) and emb.scale == pytest.approx(3 / 2**0.5)  # rsLoRA
    # scale 1 (what a reader without the metadata would use) gives other σ
    conv = adapter["unet.up_blocks.1.resnets.0.conv1"]
    s1 = factored_svdvals(conv.A, conv.B, 1.0).numpy()
    dense = np.linalg.svd(truth["unet.up_blocks.1.resnets.0.conv1"][0].numpy(), compute_uv=False)
    assert abs(s1[0] - dense[0]) > 0.1 * dense[0]


def test_sdxl_two_text_encoders_each_with_its_metadata(tmp_path):
    torch.manual_seed(0)
    te, te2 = tiny_te(), tiny_te2()
    cfg1 = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "out_proj"])
    cfg2 = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["k_proj", "fc1"],
        alpha_pattern={"fc1": 2},
        rank_pattern={"layers.1.mlp.fc1": 1},
    )
    for model, cfg in ((te, cfg1), (te2, cfg2)):
        cfg.init_lora_weights = False
        inject_adapter_in_model(cfg, model, adapter_name="default")
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
        text_encoder_lora_adapter_metadata=cfg1.to_dict(),
        text_encoder_2_lora_adapter_metadata=cfg2.to_dict(),
    )
    adapter, warned = load(tmp_path / WEIGHTS)
    assert not warned
    P = StableDiffusionXLPipeline
    sd, alphas, meta = P.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    fresh, fresh2 = tiny_te().double(), tiny_te2().double()
    P.load_lora_into_text_encoder(sd, alphas, fresh, adapter_name=ADAPTER, metadata=meta)
    P.load_lora_into_text_encoder(
        sd, alphas, fresh2, prefix="text_encoder_2", adapter_name=ADAPTER, metadata=meta
    )
    truth = {f"text_encoder.{n}": v for n, v in deltas(fresh).items()}
    truth.update({f"text_encoder_2.{n}": v for n, v in deltas(fresh2).items()})
    print("\nPEFT-style + metadata (SDXL text encoders):", assert_sigmas(adapter, truth))
    assert (
        adapter["text_encoder_2.text_model.encoder.layers.1.mlp.fc1"].scale == 2.0
    )  # r=1, alpha 2
    assert adapter["text_encoder_2.text_model.encoder.layers.0.mlp.fc1"].scale == 2 / 3
    assert adapter["text_encoder.encoder.layers.0.self_attn.q_proj"].scale == 2.0


@pytest.mark.parametrize("kind", ["sd3", "unet_conv"])
def test_dora_merged_weight_equals_fuse_lora(kind, sd3_dora_dir, tmp_path):
    if kind == "sd3":
        path, P, build = sd3_dora_dir, StableDiffusion3Pipeline, tiny_sd3
    else:  # a 3x3 conv and a Linear: one norm per output channel over in·kh·kw
        torch.manual_seed(0)
        unet = tiny_unet()
        cfg = LoraConfig(
            r=4,
            lora_alpha=2,
            target_modules=["attn1.to_q", "conv1"],
            init_lora_weights=False,
            use_dora=True,
        )
        unet.add_adapter(cfg)
        _train_magnitudes(unet)
        StableDiffusionPipeline.save_lora_weights(
            tmp_path,
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=cfg.to_dict(),
        )
        path, P, build = tmp_path, StableDiffusionPipeline, tiny_unet
    adapter, warned = load(path)
    assert len(warned) == 1 and "DoRA" in warned[0]  # load_adapter's note, nothing else
    torch.manual_seed(1)
    model = build().double()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    comp = "transformer" if kind == "sd3" else "unet"
    sd, *_, meta = P.lora_state_dict(str(path), return_lora_metadata=True)
    if kind == "sd3":
        P.load_lora_into_transformer(sd, transformer=model, adapter_name=ADAPTER, metadata=meta)
    else:
        P.load_lora_into_unet(sd, None, model, adapter_name=ADAPTER, metadata=meta)
    truth = {f"{comp}.{n}": v for n, v in deltas(model).items()}  # s·B A: no magnitude
    print(f"\nDoRA direction part ({kind}):", assert_sigmas(adapter, truth))
    model.fuse_lora()
    fused = dict(model.named_parameters())
    worst = 0.0
    for m in adapter:
        assert m.family == "dora" and m.update == "dora-direction"
        assert m.magnitude.axis == "out" and m.magnitude.m.shape == (m.d_out,)
        n = m.name[len(comp) + 1 :]
        W = base[f"{n}.weight"].reshape(m.d_out, -1)  # (out, in·kh·kw)
        ref = fused[f"{n}.base_layer.weight"].detach().reshape(m.d_out, -1)
        ours = merged_weight(m, W)  # float64, as W
        worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
        assert (ref - (W + m.delta())).abs().max() > 1e-2  # the magnitude matters
    print(f"DoRA merged weight vs fuse_lora ({kind}):", worst)
    assert worst < 1e-12


@pytest.fixture(scope="module")
def flux_alpha_file(tmp_path_factory):
    """A Flux file as ai-toolkit / "TheLastBen" write it: PEFT keys plus ``.alpha`` tensors,
    no metadata. The top-level ``proj_out`` has an alpha of its own (8; most modules 4)."""
    torch.manual_seed(0)
    model = tiny_flux()
    cfg = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "proj_out",
            "norm_out.linear",
        ],
        init_lora_weights=False,
    )
    model.add_adapter(cfg)
    tensors = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    special = {
        "proj_out": 8.0,
        "transformer_blocks.0.attn.to_q": 2.0,
        "single_transformer_blocks.0.attn.to_k": 1.0,
    }
    for key in list(tensors):
        if key.endswith(".lora_A.weight"):
            name = key[len("transformer.") : -len(".lora_A.weight")]
            tensors[f"transformer.{name}.alpha"] = torch.tensor(special.get(name, 4.0))
    path = tmp_path_factory.mktemp("flux") / "my_flux_lora.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_flux_alpha_tensors_follow_the_file(flux_alpha_file):
    adapter, warned = load(flux_alpha_file)
    assert adapter.format == "diffusers" and not warned
    P = FluxPipeline
    sd, alphas, meta = P.lora_state_dict(
        str(flux_alpha_file), return_alphas=True, return_lora_metadata=True
    )
    torch.manual_seed(1)
    model = tiny_flux().double()
    P.load_lora_into_transformer(
        sd, network_alphas=alphas, transformer=model, adapter_name=ADAPTER, metadata=meta
    )
    truth = {f"transformer.{n}": v for n, v in deltas(model).items()}
    # diffusers (get_peft_kwargs) turns proj_out's alpha into alpha_pattern {"proj_out": 8},
    # which peft also matches against single_transformer_blocks.0.proj_out, whose file alpha is 4.
    bug = "transformer.single_transformer_blocks.0.proj_out"
    assert truth[bug][1] == 2.0 and adapter[bug].scale == 1.0 and adapter[bug].alpha == 4.0
    truth[bug] = (truth[bug][0] / 2.0, 1.0)  # what the file's alpha gives
    print("\nPEFT-style + .alpha (Flux):", assert_sigmas(adapter, truth))
    assert adapter["transformer.proj_out"].scale == 2.0
    assert adapter["transformer.transformer_blocks.0.attn.to_q"].scale == 0.5
    assert adapter["transformer.single_transformer_blocks.0.attn.to_k"].scale == 0.25
    assert adapter["transformer.proj_out"].keys[-1] == "transformer.proj_out.alpha"


def test_model_level_save_lora_adapter(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    cfg = LoraConfig(
        r=4,
        lora_alpha=2,
        target_modules=["to_q", "to_v"],
        init_lora_weights=False,
        alpha_pattern={"^mid_block.attentions.0.transformer_blocks.0.attn2.to_v": 12},
    )
    unet.add_adapter(cfg)
    unet.save_lora_adapter(tmp_path)
    adapter, warned = load(tmp_path)
    assert not warned
    torch.manual_seed(1)
    fresh = tiny_unet().double()
    fresh.load_lora_adapter(str(tmp_path), prefix=None, weight_name=WEIGHTS, adapter_name=ADAPTER)
    truth = deltas(fresh)
    print("\nmodel-level file:", assert_sigmas(adapter, truth))
    assert adapter["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].scale == 3.0
    assert {m.scale for m in adapter} == {0.5, 3.0}


def test_without_metadata_scale_is_one_with_one_warning(sd_file, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / WEIGHTS
    save_file(load_file(str(sd_file)), str(path), metadata={"format": "pt"})
    adapter, warned = load(path)
    assert len(warned) == 1 and "scale 1" in warned[0] and str(path) in warned[0]
    assert {m.scale for m in adapter} == {1.0}
    truth = sd_truth(path, metadata=False)
    assert {s for _dw, s in truth.values()} == {1.0}
    print("\nPEFT-style, no metadata:", assert_sigmas(adapter, truth))
    with_meta, _ = load(sd_file)
    assert any(m.scale != 1.0 for m in with_meta)  # so the metadata file tests something else
    over, warned = load(path, alpha=2.0)  # an alpha given by the caller: no warning
    assert not warned and over["unet.down_blocks.0.resnets.0.conv1"].scale == 0.5


def test_old_attention_processor_keys(tmp_path):
    """diffusers ≤ 0.20 spellings: ``processor.to_q_lora.down``, ``.lora.down`` (a 1x1 conv),
    text-encoder ``to_q_lora`` / ``lora_linear_layer``; no alpha, diffusers loads them at s = 1."""
    gen = torch.Generator().manual_seed(0)

    def pair(prefix, d_out, d_in, r, conv=False):
        down = torch.randn(r, d_in, generator=gen)
        up = torch.randn(d_out, r, generator=gen)
        if conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        return {f"{prefix}.down.weight": down, f"{prefix}.up.weight": up}

    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    te = "text_encoder.text_model.encoder.layers"
    tensors = {
        **pair(f"{attn}.to_q_lora", 32, 32, 2),
        **pair(f"{attn}.to_k_lora", 32, 32, 4),
        **pair(f"{attn}.to_v_lora", 32, 32, 4),
        **pair(f"{attn}.to_out_lora", 32, 32, 4),
        **pair("unet.up_blocks.1.attentions.0.proj_in.lora", 32, 32, 3, conv=True),
        **pair(f"{te}.0.self_attn.to_q_lora", 32, 32, 2),
        **pair(f"{te}.0.self_attn.to_out_lora", 32, 32, 2),
        **pair(f"{te}.1.mlp.fc1.lora_linear_layer", 37, 32, 3),
    }
    save_file(tensors, str(tmp_path / WEIGHTS))
    adapter, warned = load(tmp_path)
    assert adapter.format == "diffusers"
    assert len(warned) == 1 and "scale 1" in warned[0]
    truth = sd_truth(tmp_path / WEIGHTS)
    assert {s for _dw, s in truth.values()} == {1.0}
    truth = {n.replace("text_encoder.", "text_encoder.text_model."): v for n, v in truth.items()}
    print("\nold attention-processor keys:", assert_sigmas(adapter, truth))
    out = adapter["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    assert out.keys == (f"{attn}.to_out_lora.down.weight", f"{attn}.to_out_lora.up.weight")
    assert adapter[f"{te}.0.self_attn.out_proj"].kind == "o"


def test_old_keys_with_stored_alpha_follow_the_file(tmp_path):
    """An ``.alpha`` beside old ``.lora.down`` keys: diffusers' SD loader ignores it (s = 1);
    the file's alpha is used, as for sd-scripts files."""
    gen = torch.Generator().manual_seed(0)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    down, up = torch.randn(4, 32, generator=gen), torch.randn(32, 4, generator=gen)
    tensors = {
        f"{name}.lora.down.weight": down,
        f"{name}.lora.up.weight": up,
        f"{name}.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(tmp_path / "old.safetensors"))
    adapter, warned = load(tmp_path / "old.safetensors")
    assert adapter.format == "diffusers" and not warned
    assert adapter[name].scale == 0.5
    truth = sd_truth(tmp_path / "old.safetensors")
    assert [s for _dw, s in truth.values()] == [1.0]  # diffusers drops the alpha
    err = sigma_error(adapter[name], 0.5 * truth[name][0])
    assert err < RTOL


def _write(path, tensors, meta=None):
    metadata = {"format": "pt"}
    if meta is not None:
        metadata["lora_adapter_metadata"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _pair(name, r=2, d=8):
    g = torch.Generator().manual_seed(len(name))
    return {
        f"{name}.lora_A.weight": torch.randn(r, d, generator=g),
        f"{name}.lora_B.weight": torch.randn(d, r, generator=g),
    }


Q = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
TEQ = "text_encoder.encoder.layers.0.self_attn.q_proj"
MALFORMED = {
    "B without A": ({f"{Q}.lora_B.weight": torch.ones(8, 2)}, None, ShapeError, "lora_A"),
    "unknown key": ({**_pair(Q), f"{Q}.hada_w1_a": torch.ones(2, 2)}, None, FormatError, "hada"),
    "component without metadata": (
        {**_pair(Q), **_pair(TEQ)},
        {"text_encoder.r": 2, "text_encoder.lora_alpha": 2},
        FormatError,
        "'unet'",
    ),
    "metadata and alpha": (
        {**_pair(Q), f"{Q}.alpha": torch.tensor(1.0)},
        {"unet.r": 2, "unet.lora_alpha": 2},
        FormatError,
        f"{Q}.alpha",
    ),
    "rank vs metadata": (_pair(Q), {"unet.r": 4, "unet.lora_alpha": 4}, ShapeError, "rank 2"),
    "variant": (
        _pair(Q),
        {"unet.r": 2, "unet.lora_alpha": 2, "unet.use_qalora": True},
        FormatError,
        "use_qalora",
    ),
    "alpha on some modules": (
        {**_pair(Q), **_pair(Q.replace("to_q", "to_k")), f"{Q}.alpha": torch.tensor(1.0)},
        None,
        FormatError,
        "no .alpha",
    ),
    "magnitude vs use_dora": (
        {**_pair(Q), f"{Q}.lora_magnitude_vector": torch.ones(8)},
        {"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": False},
        FormatError,
        "use_dora=False",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_refused(case, tmp_path, one_line_error):
    tensors, meta, error, words = MALFORMED[case]
    path = _write(tmp_path / WEIGHTS, tensors, meta)
    with pytest.raises(error) as excinfo:
        load_adapter(tmp_path)
    assert words in one_line_error(excinfo, path)


def test_claims(tmp_path, sd3_dora_dir):
    def layout(path):
        return detect(Probe.of(path)).name

    assert layout(sd3_dora_dir) == "diffusers"
    assert layout(sd3_dora_dir / WEIGHTS) == "diffusers"
    flat = _write(tmp_path / "any_name.safetensors", {**_pair(Q), **_pair(TEQ)})
    assert layout(flat) == "diffusers"  # every key under a component
    gpt2 = _write(tmp_path / "gpt2.safetensors", _pair("transformer.h.0.attn.c_attn"))
    assert layout(gpt2) != "diffusers"
    kohya = {
        "transformer.x.lora_down.weight": torch.ones(2, 8),
        "transformer.x.lora_up.weight": torch.ones(8, 2),
    }
    assert layout(_write(tmp_path / "kohya.safetensors", kohya)) == "kohya"
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    _write(peft_dir / "adapter_model.safetensors", _pair(Q))
    (peft_dir / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 2}')
    assert layout(peft_dir) == "peft"
    assert layout(peft_dir / "adapter_model.safetensors") == "peft"
    bare = tmp_path / "bare"
    bare.mkdir()  # a model-level file without metadata: named, not prefixed
    _write(bare / WEIGHTS, _pair("down_blocks.0.attentions.0.proj_in"))
    assert layout(bare) == "diffusers"
    adapter, warned = load(bare)
    assert [m.name for m in adapter] == ["down_blocks.0.attentions.0.proj_in"]
    assert len(warned) == 1
    with pytest.raises(LoraScopeError):  # a component prefix on some keys only
        _write(bare / WEIGHTS, {**_pair(Q), **_pair("proj_out")})
        load_adapter(bare)
    pickled = tmp_path / "bin"  # save_lora_weights(safe_serialization=False)
    pickled.mkdir()
    torch.save({**_pair(Q), **_pair(TEQ)}, pickled / "pytorch_lora_weights.bin")
    adapter, _ = load(pickled)
    assert adapter.format == "diffusers" and sorted(m.name for m in adapter) == sorted([Q, TEQ])
    renamed = tmp_path / "kohya_dir"  # sd-scripts keys under diffusers' file name
    renamed.mkdir()
    _write(renamed / WEIGHTS, kohya)
    assert layout(renamed) == "diffusers" and load(renamed)[0].format == "kohya"


def test_cli_spectrum_json_names_family_and_update(sd3_dora_dir, flux_alpha_file):
    runner = CliRunner()
    res = runner.invoke(main, ["spectrum", str(sd3_dora_dir), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 2
    assert {(r["family"], r["update"]) for r in rows} == {("dora", "dora-direction")}
    assert all(r["module"].startswith("transformer.transformer_blocks.0.attn.to_") for r in rows)
    res = runner.invoke(main, ["spectrum", str(flux_alpha_file), "--json"], catch_exceptions=False)
    rows = json.loads(res.stdout)
    assert {(r["family"], r["update"]) for r in rows} == {("lora", "full")}
    by_name = {r["module"]: r for r in rows}
    assert by_name["transformer.proj_out"]["scale"] == 2.0


def test_merge_refuses_a_lora_bias(tmp_path):
    """A lora_B.bias changes the layer's bias, which a merge of W alone would drop."""
    from safetensors.torch import save_file

    from lorascope.merge import merge_adapter

    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{name}.lora_B.weight": torch.randn(8, 2, generator=g),
        f"{name}.lora_B.bias": torch.randn(8, generator=g),
    }
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2})}
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors", metadata=meta)
    save_file(
        {name.removeprefix("unet.") + ".weight": torch.randn(8, 8, generator=g)},
        tmp_path / "base.safetensors",
    )
    with pytest.warns(LoraScopeWarning, match="bias"):
        adapter = load_adapter(tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(FormatError, match="LoRA bias"):
        merge_adapter(tmp_path / "base.safetensors", adapter, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
