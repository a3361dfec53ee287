"""PEFT LoRA adapters as models to merge: io.AdapterReader against PEFT's own merge_and_unload, through the CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import opcm_ext
from opcm_ext import io
from opcm_ext.errors import CheckpointError, DuplicateModelError, IncompatibleCheckpointError
from helpers import assert_close_dicts, build_model, load_folder, run_cli, tiny_clip_vision_config, tiny_llama_config

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_model, folder, full=None, *, seed: int, **lora):
    """Save a random LoRA adapter (B non-zero) on a copy of ``base_model``; return PEFT's merged state dict
    (also saved as a full checkpoint in ``full`` when given)."""
    torch.manual_seed(seed)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", LLAMA_TARGETS)
    model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # a task vector of a fine-tune's size, not PEFT's random-init size
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    model.save_pretrained(folder)
    merged = model.merge_and_unload()
    if full is not None:
        merged.save_pretrained(full)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = build_model(tiny_llama_config(), "LlamaForCausalLM", 0)
    base.save_pretrained(root / "base")
    adapters, fulls = [], []
    for i in range(3):
        make_adapter(base, root / f"adapter{i}", root / f"full{i}", seed=10 + i)
        adapters.append(root / f"adapter{i}")
        fulls.append(root / f"full{i}")
    return root, base, adapters, fulls


def _read_all(reader) -> dict[str, torch.Tensor]:
    return {k: reader.read(k) for k in reader.keys()}


@pytest.mark.parametrize("method", ["opcm", "task_arithmetic"])
def test_cli_merge_of_adapters_equals_merging_the_merged_models(llama, tmp_path, method):
    root, _, adapters, fulls = llama
    run_cli("merge", root / "base", *adapters, "-o", tmp_path / "from_adapters", "--method", method, "--no-progress")
    run_cli("merge", root / "base", *fulls, "-o", tmp_path / "from_full", "--method", method, "--no-progress")
    assert_close_dicts(load_folder(tmp_path / "from_adapters"), load_folder(tmp_path / "from_full"), 1e-5)
    state = opcm_ext.read_state(tmp_path / "from_adapters")
    assert [m["name"] for m in state.models] == ["adapter0", "adapter1", "adapter2"]
    assert (tmp_path / "from_adapters" / "config.json").is_file()  # the base's, not adapter_config.json
    assert not (tmp_path / "from_adapters" / "adapter_config.json").exists()


def _wchar() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_the_adapted_model_never_touches_the_disk(llama, tmp_path, monkeypatch):
    """Every byte this process writes during a 3-adapter merge is accounted for by the three outputs."""
    root, _, adapters, _ = llama
    monkeypatch.setenv("OPCM_NO_HASH_CACHE", "1")  # the cache file would be written too
    model_bytes = io.CheckpointReader(root / "base").total_bytes
    probe = _wchar()  # the counter sees writes made outside Python (safetensors writes from Rust)
    save_file(load_folder(root / "base"), str(tmp_path / "probe.safetensors"))
    assert _wchar() - probe >= model_bytes
    out = tmp_path / "merged"
    before = _wchar()
    reports = opcm_ext.merge_sequence(root / "base", adapters, out, method="opcm")
    written = _wchar() - before
    assert reports[-1].step == 3
    out_bytes = sum(f.stat().st_size for f in out.iterdir())
    slack = 16 << 10  # lock and marker files, log lines
    assert model_bytes > 2 * slack  # one materialised model (or Σ in a scratch file) would not fit the slack
    assert written <= 3 * out_bytes + slack, (written, out_bytes, model_bytes)


def test_reader_equals_peft_merge_with_patterns_embeddings_and_saved_modules(llama, tmp_path):
    root, base, _, _ = llama
    want = make_adapter(base, tmp_path / "a", seed=3, target_modules=["q_proj", "v_proj", "embed_tokens", "up_proj"],
                        rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"])
    with io.CheckpointReader(root / "base") as b, io.open_model(tmp_path / "a", b) as r:
        assert isinstance(r, io.AdapterReader)
        assert r.targets["model.embed_tokens.weight"] == "replace+lora"
        assert r.targets["lm_head.weight"] == "replace"
        assert r.targets["model.layers.0.mlp.up_proj.weight"] == "lora"
        assert "model.norm.weight" not in r.targets
        assert_close_dicts(_read_all(r), {k: want[k] for k in r.keys()}, 1e-6)
        for k in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight"):
            full = r.read(k)
            assert torch.allclose(r.read(k, rows=(3, 11)), full[3:11], atol=1e-6)
            assert torch.allclose(r.read_columns(k, 2, 9), full[:, 2:9], atol=1e-6)
            assert torch.allclose(r.read_columns(k, 5, 7, rows=(1, 4)), full[1:4, 5:7], atol=1e-6)
            buf = torch.empty(full.numel() * 4 + 64, dtype=torch.uint8)
            got = r.read(k, out=buf, rows=(0, 5))
            assert got.data_ptr() == buf.data_ptr() and torch.allclose(got, full[:5], atol=1e-6)


def test_rslora_and_lora_bias(tmp_path):
    cfg = tiny_llama_config()
    cfg.attention_bias = True
    base = build_model(cfg, "LlamaForCausalLM", 1)
    base.save_pretrained(tmp_path / "base")
    want = make_adapter(base, tmp_path / "a", seed=4, use_rslora=True, lora_bias=True, r=4, lora_alpha=16,
                        target_modules=["q_proj", "o_proj"])
    with io.CheckpointReader(tmp_path / "base") as b, io.open_model(tmp_path / "a", b) as r:
        assert r.targets["model.layers.0.self_attn.q_proj.bias"] == "bias"
        assert_close_dicts(_read_all(r), {k: want[k] for k in r.keys()}, 1e-6)
        # rsLoRA: scaling α/√r = 8, not α/r = 4
        k = "model.layers.0.self_attn.o_proj.weight"
        delta = r.read(k) - b.read(k)
        assert r.loras[k].scaling == 8.0
        assert torch.linalg.matrix_rank(delta).item() <= 4


def test_fan_in_fan_out_gpt2(tmp_path):
    from transformers import GPT2Config

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32)
    base = build_model(cfg, "GPT2LMHeadModel", 2)
    base.save_pretrained(tmp_path / "base")
    want = make_adapter(base, tmp_path / "a", tmp_path / "full", seed=5, fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj", "c_fc"])
    with io.CheckpointReader(tmp_path / "base") as b, io.open_model(tmp_path / "a", b) as r:
        k = "transformer.h.0.attn.c_attn.weight"
        assert r.loras[k].transposed and tuple(r.info(k).shape) == (32, 96)  # Conv1D stores in x out
        assert_close_dicts(_read_all(r), {k: want[k] for k in r.keys()}, 1e-6)
        assert torch.allclose(r.read_columns(k, 10, 40, rows=(4, 9)), r.read(k)[4:9, 10:40], atol=1e-6)
    rep_a = opcm_ext.merge_sequence(tmp_path / "base", [tmp_path / "a"], tmp_path / "m_a", method="task_arithmetic")
    opcm_ext.merge_sequence(tmp_path / "base", [tmp_path / "full"], tmp_path / "m_f", method="task_arithmetic")
    assert rep_a[-1].classification.startswith("module types (GPT2LMHeadModel)")
    assert_close_dicts(load_folder(tmp_path / "m_a"), load_folder(tmp_path / "m_f"), 1e-5)


def test_transformers4_vision_model_prefix(tmp_path):
    from transformers import CLIPVisionModel

    base = build_model(tiny_clip_vision_config(), "CLIPVisionModel", 3)
    base.config.save_pretrained(tmp_path / "base")
    sd = base.state_dict()
    save_file({f"vision_model.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "base" / "model.safetensors"))
    want = make_adapter(base, tmp_path / "a", seed=6, target_modules=["q_proj", "fc1"])
    assert isinstance(base, CLIPVisionModel)
    with io.CheckpointReader(tmp_path / "base") as b, io.open_model(tmp_path / "a", b) as r:
        assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in r.targets
        assert_close_dicts(_read_all(r), {f"vision_model.{k}": v for k, v in want.items()}, 1e-6)


def test_small_budget_row_blocks_and_streamed_svds(llama, tmp_path):
    root, _, adapters, fulls = llama
    reps = opcm_ext.merge_sequence(root / "base", adapters, tmp_path / "a", memory_budget="128KiB")
    opcm_ext.merge_sequence(root / "base", fulls, tmp_path / "f", memory_budget="128KiB")
    assert reps[-1].groups > 10 and reps[-1].streamed > 0
    assert_close_dicts(load_folder(tmp_path / "a"), load_folder(tmp_path / "f"), 1e-5)


def _write_adapter(folder, config: dict, tensors: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors or {"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))


def test_unsupported_adapters_are_refused_by_type(llama, tmp_path):
    root, base, _, _ = llama
    make_adapter(base, tmp_path / "dora", seed=7, use_dora=True)
    pt = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pt.save_pretrained(tmp_path / "prompt")
    ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                  feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    cfg.update(use_dora=False, init_lora_weights="pissa")
    _write_adapter(tmp_path / "pissa", cfg)
    cfg.update(init_lora_weights=True, some_future_option={"x": 1})
    _write_adapter(tmp_path / "future", cfg)
    with io.CheckpointReader(root / "base") as b:
        for name, match in (("dora", "DoRA"), ("prompt", "PROMPT_TUNING"), ("ia3", "IA3"), ("pissa", "pissa"),
                            ("future", "some_future_option")):
            with pytest.raises(CheckpointError, match=match):
                io.open_model(tmp_path / name, b)
    proc = run_cli("merge", root / "base", tmp_path / "dora", "-o", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "DoRA" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_base_mismatch(llama, tmp_path):
    root, base, adapters, _ = llama
    other_cfg = tiny_llama_config()
    other_cfg.hidden_size, other_cfg.intermediate_size = 48, 96
    other = build_model(other_cfg, "LlamaForCausalLM", 0)
    make_adapter(other, tmp_path / "wide", seed=8)
    proc = run_cli("merge", root / "base", tmp_path / "wide", "-o", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "another base model" in proc.stderr
    clip = build_model(tiny_clip_vision_config(), "CLIPVisionModel", 0)
    make_adapter(clip, tmp_path / "clip", seed=9, target_modules=["fc1"])
    with io.CheckpointReader(root / "base") as b, pytest.raises(IncompatibleCheckpointError, match="does not have"):
        io.open_model(tmp_path / "clip", b)
    # names: a recorded base that is not this one is a warning (shapes decide), a matching one is silent
    named = tmp_path / "named"
    shutil.copytree(adapters[0], named)
    cfg_path = named / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "someorg/another-llama"
    cfg_path.write_text(json.dumps(cfg))
    rep = opcm_ext.merge_stream(root / "base", None, named, tmp_path / "m1")
    assert any("someorg/another-llama" in w for w in rep.warnings)
    for recorded in ("someorg/base", str(root / "base")):
        cfg["base_model_name_or_path"] = recorded
        cfg_path.write_text(json.dumps(cfg))
        with io.CheckpointReader(root / "base") as b, io.open_model(named, b) as r:
            assert r.warnings == []
    with pytest.raises(CheckpointError, match="is a LoRA adapter"):
        opcm_ext.merge_stream(adapters[0], None, adapters[1], tmp_path / "m2")


def test_identity_is_the_adapters_own(llama, tmp_path):
    root, base, adapters, fulls = llama
    with io.CheckpointReader(root / "base") as b, io.CheckpointReader(fulls[0]) as other_base:
        h = io.content_hash(io.open_model(adapters[0], b))
        assert h == io.content_hash(io.open_model(adapters[0], other_base))  # not the materialised model
        assert h != io.content_hash(io.open_model(adapters[1], b))
        with io.CheckpointReader(fulls[0]) as f:
            assert h != io.content_hash(f)
        assert io.same_model(h, io.open_model(adapters[0], b))
        assert not io.same_model("0" * 32, io.open_model(adapters[0], b))  # an opcm-ext 0.1 hash: never an adapter
        changed = tmp_path / "alpha16"
        shutil.copytree(adapters[0], changed)
        cfg = json.loads((changed / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 16
        (changed / "adapter_config.json").write_text(json.dumps(cfg))
        assert io.content_hash(io.open_model(changed, b)) != h  # the scaling is part of the identity
    out = tmp_path / "m"
    opcm_ext.merge_sequence(root / "base", adapters[:2], out)
    with pytest.raises(DuplicateModelError, match="already merged at step 1"):
        opcm_ext.merge_stream(root / "base", out, adapters[0])
