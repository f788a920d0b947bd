"""`base.adapter`: the LoRA spec's validation, the PEFT config both sides derive from it, the adapter dir."""

import json

import pytest
import torch

from base.adapter import LoraSpec, check_target_modules, write_adapter_dir
from orchestrator.config import ConfigError, load_config


@pytest.mark.parametrize("override,message", [
    ("learner.lora={rank = 0}", r"learner\.lora\.rank"),
    ("learner.lora={rank = 8, target_modules = []}", r"learner\.lora\.target_modules"),
    ('learner.lora={target_modules = ["q_proj", "lm_head"]}', r"\['lm_head'\] cannot be served as vLLM LoRA"),
    ("learner.lora={rank = 8, alpha = 0}", r"learner\.lora\.alpha"),
    ("learner.lora={ranks = 8}", r"learner\.lora\.ranks"),
])
def test_bad_lora_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value).strip()


def test_lora_is_off_by_default_and_parsed_from_toml():
    assert load_config(None).learner.lora is None
    cfg = load_config(None, ['learner.lora={rank = 4, alpha = 8.0, target_modules = ["q_proj", "v_proj"]}'])
    assert cfg.learner.lora == LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def test_target_modules_missing_from_the_model_name_the_models_modules(tiny_model):
    from orchestrator.models import module_names

    names = module_names(tiny_model)
    check_target_modules(LoraSpec(target_modules=("q_proj", "down_proj")), names)
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no module of the model; its modules are .*'q_proj'"):
        check_target_modules(LoraSpec(target_modules=("q_proj", "qkv_proj")), names)


def test_peft_config_scaling_and_vllm_rank():
    from peft import LoraConfig

    spec = LoraSpec(rank=12, alpha=24.0, target_modules=("v_proj", "q_proj"))
    cfg = spec.peft_config()
    peft_cfg = LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})  # PEFT accepts it as written
    assert peft_cfg.r == 12 and peft_cfg.lora_alpha == 24.0 and set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    assert spec.vllm_max_lora_rank() == 16 and LoraSpec(rank=8).vllm_max_lora_rank() == 8
    assert LoraSpec(rank=1).vllm_max_lora_rank() == 1 and LoraSpec(rank=300).vllm_max_lora_rank() == 320


def test_adapter_dir_loads_into_peft_with_the_same_outputs(tiny_model, tmp_path):
    """What the rollout engine writes is a PEFT adapter: loaded on the base model it reproduces the trained one."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    cfg = spec.peft_config()
    torch.manual_seed(0)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                             LoraConfig(r=4, lora_alpha=8.0, target_modules=cfg["target_modules"]))
    for n, p in trained.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    adapter = [(n.replace(".default.", "."), p.detach()) for n, p in trained.named_parameters() if ".lora_" in n]
    path = write_adapter_dir(str(tmp_path / "ad"), spec, adapter)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path)
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        want, got = trained(ids).logits, loaded(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    assert (want - got).abs().max().item() < 1e-5
    assert (want - base).abs().max().item() > 1e-2  # the adapter changes the outputs
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        write_adapter_dir(str(tmp_path / "bad"), spec, [("model.embed_tokens.weight", torch.zeros(2, 2))])


def test_merge_adapter_equals_peft_merge(tiny_model):
    """The rollout worker's merge (W + alpha/r * B A) gives the weights PEFT's merge_and_unload gives."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from base.adapter import merge_adapter

    spec = LoraSpec(rank=4, alpha=12.0, target_modules=("q_proj", "down_proj"))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=12.0, target_modules=["q_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    adapter = [(n.replace(".default.", "."), p.detach()) for n, p in model.named_parameters() if ".lora_" in n]
    base = load_file(f"{tiny_model}/model.safetensors")
    merged = merge_adapter(base, spec, adapter)
    want = model.merge_and_unload().state_dict()
    assert set(merged) == set(base)
    for k, v in merged.items():
        assert torch.allclose(v, want[k].float(), atol=1e-6), k
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match="not an adapter of this model"):
        merge_adapter(base, spec, [("base_model.model.model.layers.9.mlp.down_proj.lora_A.weight", torch.zeros(4, 2)),
                                   ("base_model.model.model.layers.9.mlp.down_proj.lora_B.weight", torch.zeros(2, 4))])
