"""Outputs stay byte-identical across refactors: every method's output bytes against checked-in digests.

``tests/data/golden.json`` was written by this module (``OPCM_WRITE_GOLDEN=1 pytest
tests/test_golden.py``) on the code as it stood before the io/engine redesign. Each case merges a
fixed sequence of checkpoints (weights drawn from a seeded ``torch.Generator``, so the inputs do
not depend on the transformers version) in a child process pinned to one thread and to
portable code paths (MKL_CBWR=COMPATIBLE, ATEN_CPU_CAPABILITY=default), so the float64 SVD and
the reductions run the same instruction sequence on any x86-64 CPU. After every step it records
the sha256 of every output tensor's bytes, the shard layout, and the merge state without the
fields that identify the software (version) or the inputs' content hashes (their algorithm is
not part of the merge math).

Method parameters are passed explicitly, so a change of a default does not move a digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "golden.json"

CASES = {
    "clip_fp32": dict(model="clip", dtype="float32", n=4, shards=1),
    "llama_bf16_sharded": dict(model="llama", dtype="bfloat16", n=3, shards=2),
}
METHODS = {
    "opcm": {"alpha": 0.5},
    "task_arithmetic": {"lam": 0.3},
    "ties": {"lam": 0.5, "keep": 0.2},
    "average": {},
}

# The child: build the inputs, merge them step by step, print the digests as JSON.
_CHILD = r'''
import hashlib, json, sys
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
import opcm_ext

case, root = json.loads(sys.argv[1]), Path(sys.argv[2])
dtype = getattr(torch, case["dtype"])
if case["model"] == "clip":
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    arch, prefix = CLIPVisionModel, "vision_model."  # transformers-4 key names
else:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=32, tie_word_embeddings=False)
    arch, prefix = LlamaForCausalLM, ""
config.architectures = [arch.__name__]
with torch.device("meta"):
    sd_meta = arch(config).state_dict()
g = torch.Generator().manual_seed(1234)
base = {}
for k, v in sorted(sd_meta.items()):
    if v.is_floating_point():
        base[prefix + k] = torch.randn(v.shape, generator=g) * 0.05
    else:
        base[prefix + k] = torch.arange(v.numel(), dtype=v.dtype).reshape(v.shape)
models = [base] + [
    {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone() for k, v in base.items()}
    for _ in range(case["n"])
]
keys = sorted(base)
paths = []
for i, sd in enumerate(models):
    d = root / ("base" if i == 0 else f"ft{i}")
    d.mkdir(parents=True)
    config.save_pretrained(d)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    if case["shards"] == 1:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        n = case["shards"]
        parts = [keys[j::n] for j in range(n)]
        wm = {}
        for j, part in enumerate(parts):
            fname = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            save_file({k: sd[k] for k in part}, str(d / fname), metadata={"format": "pt"})
            wm.update({k: fname for k in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    paths.append(d)

def digest(folder):
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    out = {"files": {}, "tensors": {}}
    state = None
    for f in files:
        with safe_open(str(folder / f), "pt") as sf:
            md = sf.metadata() or {}
            out["files"][f] = sorted(sf.keys())
            for k in sf.keys():
                t = sf.get_tensor(k).contiguous()
                raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
                out["tensors"][k] = [str(t.dtype), list(t.shape), hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:20]]
        st = json.loads(md["opcm_ext.state"])
        st.pop("version")
        st["base"].pop("hash")
        for m in st["models"]:
            m.pop("hash")
        st["format_key"] = md.get("format")
        if st["params"].get("compat") == "paper":  # a parameter added after the digests were recorded
            del st["params"]["compat"]
        state = st if state is None else state
        assert st == state, "shards disagree on the state"
    if (folder / "model.safetensors.index.json").exists():
        out["index"] = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out["state"] = state
    return out

result = {}
for method, params in json.loads(sys.argv[3]).items():
    out = root / f"out-{method}"
    steps = []
    for t, p in enumerate(paths[1:], start=1):
        opcm_ext.merge_stream(paths[0], None if t == 1 else out, p, out, method=method, device="cpu", **params)
        steps.append(digest(out))
    result[method] = steps
print(json.dumps(result, sort_keys=True))
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPCM_SVD_WORKERS="1",
        MKL_CBWR="COMPATIBLE", ATEN_CPU_CAPABILITY="default",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    return env


def _run_case(case: dict) -> dict:
    with tempfile.TemporaryDirectory() as root:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(case), root, json.dumps(METHODS)],
            capture_output=True, text=True, env=_env(), cwd=tempfile.gettempdir(), timeout=900,
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_golden_digests(case):
    got = _run_case(CASES[case])
    if os.environ.get("OPCM_WRITE_GOLDEN") == "1":
        data = json.loads(DATA.read_text()) if DATA.exists() else {}
        data[case] = got
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden digests written")
    want = json.loads(DATA.read_text())[case]
    assert sorted(got) == sorted(want)
    for method in want:
        for t, (g, w) in enumerate(zip(got[method], want[method], strict=True), start=1):
            assert g["files"] == w["files"], (method, t)
            assert g.get("index") == w.get("index"), (method, t)
            assert g["state"] == w["state"], (method, t)
            bad = sorted(k for k in w["tensors"] if g["tensors"].get(k) != w["tensors"][k])
            assert not bad, f"{method} step {t}: {len(bad)} tensor(s) differ from the golden bytes, e.g. {bad[:3]}"

