"""Resolving --model, loading (plain, GPTQ, model templates), and failing clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from personas.model.choice import EMBEDDED, ModelChoice, default_model_spec, resolve_model
from personas.model.gptq import gptq_config_of
from personas.model.load import load_model
from personas.errors import ExitStatus, InputError, ModelError
from personas.generate.request import Request, plan, sample_records
from personas.library.schema import Example, Persona
from personas.model.prompt import Dialog
from personas.sampling.grid import Settings

PIRATE = Persona(name="pirate", system="You are a pirate.", prompt="Hello there",
                 examples=[Example(user="How are you?", assistant="I am fine.")])


def test_resolve_presets_paths_and_hub_ids(tmp_path):
    assert resolve_model("llama2-13b-gptq") == ModelChoice(
        "llama2-13b-gptq", "hub", "TheBloke/Llama-2-13B-chat-GPTQ", llama2_chat=True)
    assert resolve_model("llama2-7b-gptq").location == "TheBloke/Llama-2-7B-chat-GPTQ"
    with pytest.raises(InputError, match="holds no config.json: it is not a model"):
        resolve_model(str(tmp_path))
    ggufs = tmp_path / "ggufs"
    ggufs.mkdir()
    (ggufs / "model.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(InputError, match=f"but GGUF files — pass one of them: --model {ggufs / 'model.Q4_0.gguf'}"):
        resolve_model(str(ggufs))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).kind == "dir"
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer_config.json").write_text("{}")
    assert resolve_model(str(tokenizer_only)).kind == "dir", "a tokenizer alone serves render --ids"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model(str(gguf)).kind == "gguf"
    assert resolve_model("someone/some-model").kind == "hub"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(InputError, match="is not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(InputError, match="not found.*--model embedded"):
        resolve_model("./no/such/dir")
    with pytest.raises(InputError, match="not found"):
        resolve_model("nonsense")


def test_auto_picks_13b_on_cuda_and_embedded_without():
    on_gpu = resolve_model("auto", has_cuda=lambda: True)
    assert (on_gpu.label, on_gpu.reason) == ("llama2-13b-gptq", "a CUDA GPU is present")
    on_cpu = resolve_model("auto", has_cuda=lambda: False)
    assert (on_cpu.label, on_cpu.kind, on_cpu.reason) == (EMBEDDED, "embedded", "no CUDA GPU found")
    assert Path(on_cpu.location).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_model_spec_precedence(monkeypatch):
    monkeypatch.setenv("PERSONAS_MODEL", "from-env")
    assert default_model_spec("flag", "file") == "flag"
    assert default_model_spec(None, "file") == "file"
    assert default_model_spec(None, None) == "from-env"
    monkeypatch.delenv("PERSONAS_MODEL")
    assert default_model_spec(None, None) == "auto"


def test_hub_id_missing_offline_fails_with_a_pointer_to_embedded():
    with pytest.raises(ModelError) as info:
        load_model(resolve_model("TheBloke/Llama-2-13B-chat-GPTQ"), device="cpu")
    assert info.value.exit_status == ExitStatus.ERROR
    assert "not in the local Hugging Face cache" in str(info.value)
    assert "--model embedded" in str(info.value)


def test_incomplete_model_folder_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        load_model(resolve_model(str(tmp_path)), device="cpu")


def test_no_cuda_asked_for_cuda(tiny_llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="no CUDA GPU"):
        load_model(resolve_model(str(tiny_llama_dir)), device="cuda")


def test_plain_model_without_chat_template_uses_llama2_format(tiny_llama_dir):
    model = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    assert model.template == "llama2" and model.gptq_kernel is None
    dialog = Dialog.for_persona(PIRATE, "Hello there")
    assert model.prompt_text(dialog).startswith("<s>[INST] <<SYS>>\nYou are a pirate.")
    ids = model.prompt_ids(dialog)
    assert ids[0] == model.tokenizer.bos_token_id and ids.count(model.tokenizer.bos_token_id) == 2


def test_chat_template_model_uses_its_template(tiny_chatml_dir):
    model = load_model(resolve_model(str(tiny_chatml_dir)), device="cpu")
    assert model.template == "model"
    assert model.prompt_text(Dialog(None, (), "hi")) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") in model.eos_ids
    records = []
    request = Request(personas=[PIRATE], temperatures=[0.0, 1.0], n=2, seed=1, settings=Settings(max_new_tokens=5))
    sample_records(request.settings, model, plan(request, model), records.append)
    assert len(records) == 4


def test_prompt_longer_than_context_is_refused_with_counts(tiny_llama_dir):
    model = load_model(resolve_model(str(tiny_llama_dir)), device="cpu")
    request = Request(personas=[PIRATE], prompts=["fox " * 600], settings=Settings(max_new_tokens=16))
    with pytest.raises(InputError, match=r"the prompt is \d+ tokens and 16 new tokens .* context is 512"):
        plan(request, model)


@pytest.mark.slow
def test_gptq_checkpoint_loads_through_personas_and_generates(tiny_gptq_dir):
    assert gptq_config_of(str(tiny_gptq_dir))["bits"] == 4
    model = load_model(resolve_model(str(tiny_gptq_dir)), device="cpu", gptq_backend="torch")
    assert model.gptq_kernel is not None and "Linear" in model.gptq_kernel
    request = Request(personas=[PIRATE], temperatures=[0.0, 1.0], n=3, seed=2, settings=Settings(max_new_tokens=8))
    records = []
    sample_records(request.settings, model, plan(request, model), records.append)
    assert len(records) == 6
    assert sum(r.new_tokens for r in records) > 0
    greedy = {r.text for r in records if r.temperature == 0.0}
    assert len(greedy) == 1


def write_awq(source: Path, out: Path, group: int = 32) -> Path:
    """The tiny Llama's layers as a 4-bit AWQ checkpoint (GEMM layout: qweight (in, out / 8),
    qzeros (in / group, out / 8), fp16 scales), random codes; its embeddings, norms and head kept."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    stored = {}
    for name, tensor in weights.items():
        if not name.endswith("proj.weight"):
            stored[name] = tensor
            continue
        base, (out_f, in_f) = name.removesuffix(".weight"), tensor.shape
        stored[base + ".qweight"] = torch.randint(-(2**31), 2**31, (in_f, out_f // 8), generator=generator,
                                                  dtype=torch.int64).to(torch.int32)
        stored[base + ".qzeros"] = torch.full((in_f // group, out_f // 8), 0x88888888 - 2**32,
                                              dtype=torch.int64).to(torch.int32)
        stored[base + ".scales"] = torch.full((in_f // group, out_f), 0.02, dtype=torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                     "version": "gemm"}
    (out / "config.json").write_text(json.dumps(config))
    for f in source.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_an_awq_checkpoint_loads_through_gptqmodel_and_runs_in_the_engine(tiny_llama_dir, tmp_path):
    """AWQ goes where gptqmodel takes it (transformers' AWQ integration): its layers' kernel is
    reported, never fused as GPTQ, kept off CUDA graphs unless known safe, and the engine's
    greedy tokens equal transformers' `generate` on the same modules."""
    pytest.importorskip("gptqmodel")
    import torch

    from personas.engine.chunked.graphed import GRAPH_SAFE_KERNELS
    from personas.engine.decoder import supports

    model = load_model(resolve_model(str(write_awq(tiny_llama_dir, tmp_path / "awq"))), device="cpu")
    assert model.gptq_kernel and "Awq" in model.gptq_kernel and model.gptq_fused == 0
    assert model.gptq_kernel not in GRAPH_SAFE_KERNELS and supports(model.model)
    request = Request(personas=[PIRATE], temperatures=[0.0], n=1, seed=2, settings=Settings(max_new_tokens=12))
    rows = plan(request, model)
    records = []
    sample_records(request.settings, model, rows, records.append)
    ids = torch.tensor([rows[0].prompt_ids])
    expected = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    eos_token_id=model.eos_ids, pad_token_id=model.pad_id)[0, ids.shape[1]:].tolist()
    expected = expected[:next((i for i, t in enumerate(expected) if t in model.eos_ids), len(expected))]
    assert records[0].text == model.decode(expected) and records[0].new_tokens == len(expected)


def test_an_awq_checkpoint_gptqmodel_cannot_load_is_one_clear_line(tiny_llama_dir, tmp_path):
    pytest.importorskip("gptqmodel")
    import json

    broken = write_awq(tiny_llama_dir, tmp_path / "awq")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["bits"] = 3  # AWQ has no 3-bit layout
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as failure:
        load_model(resolve_model(str(broken)), device="cpu")
    assert "cannot load the AWQ checkpoint" in failure.value.what and "gptqmodel" in failure.value.todo


def test_unknown_gptq_backend_is_bad_input(tiny_gptq_dir):
    with pytest.raises(InputError, match="unknown GPTQ backend 'warp'"):
        load_model(resolve_model(str(tiny_gptq_dir)), device="cpu", gptq_backend="warp")


@pytest.fixture(scope="module")
def pickle_only_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama with its weights as a pickle file (pytorch_model.bin) and no safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle-only")
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), out / "pytorch_model.bin")
    return out


def test_pickle_weights_are_refused_unless_allowed(pickle_only_dir):
    with pytest.raises(InputError, match=r"only pickle weights .* --allow-pickle") as info:
        load_model(resolve_model(str(pickle_only_dir)), device="cpu")
    assert info.value.exit_status == ExitStatus.BAD_INPUT
    model = load_model(resolve_model(str(pickle_only_dir)), device="cpu", allow_pickle=True)
    request = Request(personas=[PIRATE], temperatures=[0.0], n=1, seed=1, settings=Settings(max_new_tokens=3))
    records = []
    sample_records(request.settings, model, plan(request, model), records.append)
    assert len(records) == 1


def test_pickle_refusal_from_the_cli(pickle_only_dir, capsys):
    from personas.cli import main

    assert main(["generate", "customer", "--model", str(pickle_only_dir), "-n", "1"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("Error: ") and "--allow-pickle" in err


def test_personas_auto_kernel_is_marlin_on_cuda_only_where_marlin_fits():
    import torch

    from personas.model.gptq import gptq_kernel_for

    thebloke = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    assert gptq_kernel_for("auto", thebloke, torch.device("cpu")) == "auto"  # gptqmodel picks its CPU kernel
    assert gptq_kernel_for("triton", thebloke, torch.device("cpu")) == "triton"  # an explicit choice stands
    if torch.cuda.is_available():
        capable = torch.cuda.get_device_capability() >= (7, 5)
        assert gptq_kernel_for("auto", thebloke, torch.device("cuda")) == ("marlin" if capable else "auto")
        assert gptq_kernel_for("auto", {**thebloke, "sym": False}, torch.device("cuda")) == "auto"
        assert gptq_kernel_for("auto", {**thebloke, "bits": 3}, torch.device("cuda")) == "auto"
