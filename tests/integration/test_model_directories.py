"""Hugging Face model directories, end to end through the real broker, engine and image: each
shard in its own sandbox, the output directory what a ``safetensors``/``transformers`` user
expects, byte-equal to the source tensors; code and pickles never carried over; a hostile or
inconsistent shard fails the whole directory and leaves no output behind."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from airlock_client import Client, ConversionError
from tests.adversarial import payloads
from tests.conftest import BrokerProcess, run_cli
from tests.fixtures import hf_models

pytestmark = pytest.mark.integration


def _load(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    with safe_open(str(path), framework="pt") as fh:  # numpy has no bfloat16
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118


def _assert_tensor_equal(name: str, got: Any, want: np.ndarray) -> None:
    import torch

    assert tuple(got.shape) == want.shape, name
    raw = got.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert raw == want.tobytes(), f"{name}: bytes differ"


def _no_leftovers(parent: Path, keep: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == keep, "partial or temporary output left"


def _convert(directory: Path, out: Path, *args: str,
             broker: BrokerProcess) -> tuple[int, dict[str, Any], str]:
    done = run_cli("convert", str(directory), "-o", str(out), "--json", *args,
                   server=broker.address, timeout=600)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.returncode, doc, done.stderr


def test_a_sharded_checkpoint_becomes_a_safetensors_directory(broker: BrokerProcess,
                                                               tmp_path: Path) -> None:
    model = hf_models.make_sharded(tmp_path / "tiny", shards=3)
    out = tmp_path / "tiny-safe"
    began = time.monotonic()
    code, doc, stderr = _convert(model.path, out, "--jobs", "2", broker=broker)
    print(f"3-shard directory converted in {time.monotonic() - began:.1f} s")  # for -s runs
    assert code == 0, (doc, stderr)
    assert doc["status"] == "ok" and doc["assurance"] == "integrity_verified", doc
    assert "shards 3/3 done" in stderr

    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got: dict[str, Any] = {}
    for name in names:
        tensors, meta = _load(out / name)
        assert meta.get("format") == "pt"
        assert {k for k, v in index["weight_map"].items() if v == name} == set(tensors)
        got.update(tensors)
        assert (out / f"{name}.provenance.json").is_file()
    # The tied head is stored once and named in the shard, the index and the report.
    assert index["metadata"]["deduplicated"] == model.tied == doc["deduplicated"]
    assert _load(out / names[0])[1]["model.embed_tokens.weight"] == "lm_head.weight"
    assert set(index["weight_map"]) == set(model.expected) - set(model.tied)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in got.values())
    for name, want in model.expected.items():
        _assert_tensor_equal(name, got[model.tied.get(name, name)], want)

    for name, text in hf_models.DATA_FILES.items():
        assert (out / name).read_text(encoding="utf-8") == text, name
    assert (out / "tokenizer.model").read_bytes() == (model.path / "tokenizer.model").read_bytes()
    skipped = {s["name"]: s["why"] for s in doc["skipped"]}
    assert set(hf_models.NEVER_CARRIED) <= set(skipped)
    for name in hf_models.NEVER_CARRIED:
        assert not (out / name).exists(), f"{name} was carried over"
    assert "trust_remote_code" in skipped["modeling_tiny.py"]
    assert [s["source"] for s in doc["shards"]] == sorted(model.shards)
    assert all(s["assurance"] == "integrity_verified" for s in doc["shards"])
    _no_leftovers(tmp_path, {"tiny", "tiny-safe"})

    _assert_loads_like_transformers(out, index)

    # Every output shard checks out against its own signed provenance, and so does the index,
    # which the broker signed after checking it against the shards' records.
    verified = run_cli("verify", str(out / names[1]), server=broker.address)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    verified = run_cli("verify", str(out / "model.safetensors.index.json"), "--json",
                       server=broker.address)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    record = json.loads(verified.stdout)["record"]
    assert record["kind"] == "safetensors_index"
    assert [s["file_name"] for s in record["shards"]] == names
    assert [s["sha256"] for s in record["shards"]] == [s["sha256"] for s in doc["shards"]]
    assert record["subject"] == str(model.path)


def test_a_directory_verifies_as_a_whole_and_a_swapped_shard_does_not(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """``airlock verify DIR``: each weights file against its record, and the set against
    the index's record. A shard taken from another conversion verifies on its own, and the
    directory does not; nor does a file nothing signed."""
    import torch

    model = hf_models.make_sharded(tmp_path / "tiny", shards=3)
    other = hf_models.make_sharded(tmp_path / "other", shards=3, extras=False)
    second = other.path / "pytorch_model-00002-of-00003.bin"
    state = torch.load(second, weights_only=True)  # our own file, written just above
    torch.save({k: v + 1 for k, v in state.items()}, second)
    out, out_other = tmp_path / "tiny-safe", tmp_path / "other-safe"
    for source, dest in ((model.path, out), (other.path, out_other)):
        code, doc, stderr = _convert(source, dest, broker=broker)
        assert code == 0, (doc, stderr)

    verified = run_cli("verify", str(out), "--json", server=broker.address)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    doc = json.loads(verified.stdout)
    assert [f["name"] for f in doc["files"]] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert doc["index"]["kind"] == "safetensors_index"
    # Each carried data file has a record of its own, as a data file of its kind.
    carried = {f["name"]: f["record"] for f in doc["carried"]}
    assert set(carried) == set(hf_models.DATA_FILES) | {"tokenizer.model"}, carried
    assert carried["config.json"]["output_format"] == "data"
    assert carried["config.json"]["declared_format"] == "json"
    assert carried["tokenizer.model"]["declared_format"] == "sentencepiece"
    assert carried["config.json"]["assurance"] == "integrity_verified"
    # Alone, a data file's record passes only as a data file's: a model's check refuses it.
    alone = run_cli("verify", str(out / "config.json"), "--json", server=broker.address)
    assert alone.returncode == 1 and json.loads(alone.stdout)["reason"] == "OUTPUT_KIND"
    alone = run_cli("verify", str(out / "config.json"), "--data-file", server=broker.address)
    assert alone.returncode == 0 and "a data file: checked as json" in alone.stdout, alone

    # A config.json changed after the conversion steers loading and is no longer what was
    # signed (it was listed unsigned, and the directory verified, before data files had
    # records).
    config = (out / "config.json").read_bytes()
    (out / "config.json").write_bytes(config.replace(b"{", b'{"auto_map": {"AutoModel": '
                                                          b'"evil.Model"}, ', 1))
    tampered = run_cli("verify", str(out), "--json", server=broker.address)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    failed = json.loads(tampered.stdout)
    assert failed["reason"] == "OUTPUT_MISMATCH" and "config.json" in failed["message"], failed
    (out / "config.json").write_bytes(config)
    # So does one whose record is gone.
    record = (out / "config.json.provenance.json").read_bytes()
    (out / "config.json.provenance.json").unlink()
    unsigned = run_cli("verify", str(out), "--json", server=broker.address)
    assert json.loads(unsigned.stdout)["reason"] == "PROVENANCE_MISSING", unsigned.stdout
    (out / "config.json.provenance.json").write_bytes(record)

    shard = "model-00002-of-00003.safetensors"
    kept = {name: (out / name).read_bytes() for name in (shard, f"{shard}.provenance.json")}
    for name in kept:
        (out / name).write_bytes((out_other / name).read_bytes())
    alone = run_cli("verify", str(out / shard), server=broker.address)
    assert alone.returncode == 0, alone.stdout + alone.stderr  # signed, on its own
    swapped = run_cli("verify", str(out), "--json", server=broker.address)
    assert swapped.returncode == 1, swapped.stdout + swapped.stderr
    failed = json.loads(swapped.stdout)
    assert failed["reason"] == "OUTPUT_MISMATCH" and shard in failed["message"], failed

    for name, data in kept.items():  # back as it was, plus a file nothing signed
        (out / name).write_bytes(data)
    (out / "model-00004-of-00003.safetensors").write_bytes(b"stray")
    stray = run_cli("verify", str(out), "--json", server=broker.address)
    assert stray.returncode == 1 and json.loads(stray.stdout)["reason"] == "UNEXPECTED_FILE"
    (out / "model-00004-of-00003.safetensors").unlink()
    whole = run_cli("verify", str(out), server=broker.address)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert f"subject    {str(model.path)!r}" in whole.stdout  # who asked, what for: shown
    # What the directory was said to be, pinned: the index's subject.
    assert run_cli("verify", str(out), "--subject", str(model.path),
                   server=broker.address).returncode == 0
    other_subject = run_cli("verify", str(out), "--subject", str(other.path), "--json",
                            server=broker.address)
    assert other_subject.returncode == 1, other_subject.stdout


def _assert_loads_like_transformers(out: Path, index: dict[str, Any]) -> None:
    """What ``from_pretrained`` does with such a directory: read the shards the index names,
    re-tie the de-duplicated names, then a strict ``load_state_dict`` into the architecture."""
    import torch
    from safetensors.torch import load_file

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(32, 8)
    model.model.layers = torch.nn.ModuleDict({str(i): torch.nn.Linear(8, 8) for i in (1, 2)})
    model.model.norm = torch.nn.LayerNorm(8, bias=False)
    model.lm_head = torch.nn.Linear(8, 32, bias=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    state: dict[str, Any] = {}
    for filename in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(out / filename)))
    for removed, kept in index["metadata"]["deduplicated"].items():
        state[removed] = state[kept]
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"])


def test_an_unsharded_directory_through_the_python_api(broker: BrokerProcess,
                                                       tmp_path: Path) -> None:
    model = hf_models.make_unsharded(tmp_path / "tiny")
    steps: list[str] = []
    with Client(broker.address) as client:
        result = client.convert_directory(model.path, tmp_path / "out",
                                          progress=lambda p: steps.append(p.line()))
    assert result.integrity_verified and result.index is None
    assert [s.output for s in result.shards] == ["model.safetensors"]
    assert result.deduplicated == model.tied
    tensors, _ = _load(tmp_path / "out" / "model.safetensors")
    for name, want in model.expected.items():
        _assert_tensor_equal(name, tensors[model.tied.get(name, name)], want)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert len(steps) == 1 and steps[0].startswith("shards 1/1 done")


def test_a_peft_adapter_directory_becomes_what_peft_loads(broker: BrokerProcess,
                                                          tmp_path: Path) -> None:
    """A LoRA adapter saved the old way (``adapter_model.bin``, a torch pickle) beside its
    ``adapter_config.json``: ``adapter_model.safetensors`` with the same tensors byte for
    byte, integrity-verified, the config carried."""
    import torch

    lora = tmp_path / "lora"
    lora.mkdir()
    generator = torch.Generator().manual_seed(7)
    state = {f"base_model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight":
             torch.randn(shape, generator=generator)
             for i in range(2) for p in ("q", "v")
             for ab, shape in (("A", (4, 16)), ("B", (16, 4)))}
    torch.save(state, lora / "adapter_model.bin")
    config = '{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}'
    (lora / "adapter_config.json").write_text(config)
    out = tmp_path / "lora-safe"
    code, doc, stderr = _convert(lora, out, broker=broker)
    assert code == 0, (doc, stderr)
    assert doc["assurance"] == "integrity_verified" and doc["carried"] == ["adapter_config.json"]
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_config.json.provenance.json",
        "adapter_model.safetensors", "adapter_model.safetensors.provenance.json"]
    assert (out / "adapter_config.json").read_text() == config
    from safetensors.torch import load_file

    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(state)
    for name, want in state.items():
        assert got[name].numpy().tobytes() == want.numpy().tobytes(), name
    assert run_cli("verify", str(out), server=broker.address).returncode == 0

    # A signed adapter dropped into a verified model's directory: each file verifies alone,
    # and the directory does not (no conversion writes both).
    model = hf_models.make_unsharded(tmp_path / "tiny")
    code, doc, stderr = _convert(model.path, tmp_path / "tiny-safe", broker=broker)
    assert code == 0, (doc, stderr)
    for name in ("adapter_model.safetensors", "adapter_model.safetensors.provenance.json",
                 "adapter_config.json"):
        (tmp_path / "tiny-safe" / name).write_bytes((out / name).read_bytes())
    mixed = run_cli("verify", str(tmp_path / "tiny-safe"), "--json", server=broker.address)
    assert mixed.returncode == 1, mixed.stdout + mixed.stderr
    assert json.loads(mixed.stdout)["reason"] == "UNEXPECTED_FILE"


def test_an_mlflow_transformers_model_becomes_a_safetensors_directory(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """Its weights directory converted shard by shard, its tokenizer carried beside them,
    MLflow's own files left out: what from_pretrained reads."""
    model = hf_models.make_mlflow_transformers(tmp_path / "bundle", shards=2)
    out = tmp_path / "bundle-safe"
    code, doc, stderr = _convert(model.path, out, broker=broker)
    assert code == 0, (doc, stderr)
    assert doc["assurance"] == "integrity_verified", doc
    assert sorted(doc["carried"]) == sorted(["config.json", *hf_models.TOKENIZER_FILES])
    assert {s["name"] for s in doc["skipped"]} >= {"MLmodel", "conda.yaml", "requirements.txt"}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got: dict[str, Any] = {}
    for name in sorted(set(index["weight_map"].values())):
        got.update(_load(out / name)[0])
    for name, want in model.expected.items():
        _assert_tensor_equal(name, got[model.tied.get(name, name)], want)
    assert (out / "tokenizer.json").read_text() == hf_models.DATA_FILES["tokenizer.json"]
    assert not (out / "MLmodel").exists()


def test_one_shard_alone_converts_as_before(broker: BrokerProcess, tmp_path: Path) -> None:
    model = hf_models.make_sharded(tmp_path / "tiny", shards=3, extras=False)
    shard = model.path / "pytorch_model-00002-of-00003.bin"
    done = run_cli("convert", str(shard), "--json", server=broker.address)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["output"] == str(model.path / "pytorch_model-00002-of-00003.safetensors")
    assert doc["assurance"] == "integrity_verified"


def test_a_malicious_shard_fails_the_directory_with_its_reason(broker: BrokerProcess,
                                                               tmp_path: Path) -> None:
    model = hf_models.make_sharded(tmp_path / "tiny", shards=3)
    canary = tmp_path / "canary.txt"
    bad = "pytorch_model-00002-of-00003.bin"
    payloads.malicious_torch_zip(model.path / bad,
                                 payloads.escape_attempt_source(canary, [9], ["127.0.0.1"]))
    out = tmp_path / "out"
    code, doc, _ = _convert(model.path, out, "--jobs", "1", broker=broker)
    assert code == 1, doc
    assert doc["status"] in {"rejected", "failed"} and doc["reason"], doc
    assert doc["shard"] == bad and bad in doc["message"] and doc["output"] is None
    assert not canary.exists(), "the payload wrote a file on the host"
    _no_leftovers(tmp_path, {"tiny"})

    # A re-run converts again (and fails again the same way: nothing was remembered).
    code, again, _ = _convert(model.path, out, "--jobs", "1", broker=broker)
    assert code == 1 and (again["reason"], again["shard"]) == (doc["reason"], bad)
    _no_leftovers(tmp_path, {"tiny"})


def test_a_shard_that_runs_code_fails_the_directory_unless_code_is_allowed(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """A directory loads safe_only by default: a shard whose loading runs code is refused
    with its name. Asked for allow_code, it converts, and the report says code ran there."""
    model = hf_models.make_sharded(tmp_path / "tiny", shards=2, extras=False)
    bad = "pytorch_model-00002-of-00002.bin"
    hf_models.add_code_entry(model.path / bad)
    out = tmp_path / "out"
    code, doc, _ = _convert(model.path, out, broker=broker)
    assert code == 1 and (doc["reason"], doc["shard"]) == ("POLICY_VIOLATION", bad), doc
    assert bad in doc["message"]
    _no_leftovers(tmp_path, {"tiny"})

    done = run_cli("convert", str(model.path), "-o", str(out), "--policy", "allow_code",
                   server=broker.address, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"artifact code executed in sandbox: yes (shards: {bad})" in done.stdout, done.stdout


def test_training_checkpoints_as_shards_give_their_state_dicts_and_say_what_was_left_out(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """Shards saved as {"state_dict", "optimizer", "epoch"}: the state dicts are converted
    (their names are what the index says), and each shard's left-out optimizer state is
    printed as that shard's warning."""
    model = hf_models.make_training_shards(tmp_path / "tiny", shards=2)
    out = tmp_path / "out"
    done = run_cli("convert", str(model.path), "-o", str(out), server=broker.address,
                   timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for shard, names in model.shards.items():
        assert f"warning    {shard}: left out 'optimizer': {len(names)} tensor(s)" in done.stdout, (
            done.stdout)
    got: dict[str, Any] = {}
    for i in (1, 2):
        got.update(_load(out / f"model-0000{i}-of-00002.safetensors")[0])
    for name, want in model.expected.items():
        _assert_tensor_equal(name, got[model.tied.get(name, name)], want)


def test_a_lightning_checkpoint_as_the_weights_converts_to_its_state_dict(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """A Lightning .ckpt saved as pytorch_model.bin: its state dict, under safe_only (the
    directory's default); the optimizer and callbacks left out, each said in a warning."""
    from tests.fixtures import models

    artifact, check = models.make_lightning_checkpoint(tmp_path / "in")
    directory = tmp_path / "m"
    directory.mkdir()
    artifact.rename(directory / "pytorch_model.bin")
    done = run_cli("convert", str(directory), "-o", str(tmp_path / "out"),
                   server=broker.address, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for entry, count in check.left_out.items():
        assert f"warning    pytorch_model.bin: left out {entry!r}: {count} tensor(s)" in (
            done.stdout), done.stdout
    tensors, _ = _load(tmp_path / "out" / "model.safetensors")
    assert set(tensors) == set(check.expected)
    for name, want in check.expected.items():
        _assert_tensor_equal(name, tensors[name], want)


def test_a_directory_holding_one_lightning_checkpoint_converts_to_model_safetensors(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """A directory as a training run leaves it: ``model.ckpt`` (Lightning), its config, and
    the trainer's own ``optimizer.pt``, a pickle that is never carried nor taken for the
    model. The output is what ``from_pretrained`` reads, and ``verify DIR`` accepts it."""
    import torch

    from tests.fixtures import models

    artifact, check = models.make_lightning_checkpoint(tmp_path / "in")
    directory = tmp_path / "run"
    directory.mkdir()
    artifact.rename(directory / "model.ckpt")
    torch.save({"state": {}, "param_groups": []}, directory / "optimizer.pt")
    (directory / "config.json").write_text('{"hidden": 16}')
    code, doc, _ = _convert(directory, tmp_path / "out", broker=broker)
    assert code == 0, doc
    assert doc["assurance"] == "integrity_verified", doc
    assert [s["source"] for s in doc["shards"]] == ["model.ckpt"], doc
    assert doc["carried"] == ["config.json"]
    assert "optimizer.pt" in {s["name"] for s in doc["skipped"]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "config.json.provenance.json", "model.safetensors",
        "model.safetensors.provenance.json"]
    tensors, _ = _load(tmp_path / "out" / "model.safetensors")
    assert set(tensors) == set(check.expected)
    for name, want in check.expected.items():
        _assert_tensor_equal(name, tensors[name], want)
    assert run_cli("verify", str(tmp_path / "out"), server=broker.address).returncode == 0


def test_an_index_naming_a_file_outside_the_directory_is_refused(broker: BrokerProcess,
                                                                  tmp_path: Path) -> None:
    model = hf_models.make_sharded(tmp_path / "tiny", shards=2, extras=False)
    (tmp_path / "secret.bin").write_bytes(b"not yours")

    def escape(doc: dict[str, Any]) -> None:
        doc["weight_map"]["model.norm.weight"] = "../secret.bin"

    hf_models.rewrite_index(model.path, escape)
    code, doc, _ = _convert(model.path, tmp_path / "out", broker=broker)
    assert code == 1 and (doc["status"], doc["reason"]) == ("rejected", "UNSAFE_MODEL_DIR"), doc
    assert "../secret.bin" in doc["message"]
    _no_leftovers(tmp_path, {"tiny", "secret.bin"})


def test_an_index_that_disagrees_with_a_shard_is_refused(broker: BrokerProcess,
                                                         tmp_path: Path) -> None:
    model = hf_models.make_sharded(tmp_path / "tiny", shards=2, extras=False)
    last = "pytorch_model-00002-of-00002.bin"

    def disagree(doc: dict[str, Any]) -> None:
        doc["weight_map"]["model.ghost.weight"] = last

    hf_models.rewrite_index(model.path, disagree)
    code, doc, _ = _convert(model.path, tmp_path / "out", broker=broker)
    assert code == 1 and (doc["reason"], doc["shard"]) == ("INDEX_MISMATCH", last), doc
    assert "'model.ghost.weight'" in doc["message"]
    _no_leftovers(tmp_path, {"tiny"})


@pytest.mark.parametrize(("raw", "declared", "said"), [
    (b'{"hidden_size": 8, "hidden_size": 9}', "json", "not strict JSON"),  # two meanings
    (b"vocab\0with a NUL", "text", "NUL"),
    (b'{"pieces": []}', "sentencepiece", "not a SentencePiece model"),
])
def test_a_data_file_that_is_not_its_kind_is_refused_by_its_sandbox(
        broker: BrokerProcess, tmp_path: Path, raw: bytes, declared: str, said: str) -> None:
    """What a directory's data files go through (the client checks first, so a directory
    with such a file skips it): the sandbox's check, whose refusal is the job's answer."""
    source = tmp_path / "data"
    source.write_bytes(raw)
    with Client(broker.address) as client, pytest.raises(ConversionError) as caught:
        client.convert(source, tmp_path / "out", declared_format=declared)  # type: ignore[arg-type]
    assert caught.value.reason == "FORMAT_MISMATCH" and said in caught.value.message, caught.value
    assert not (tmp_path / "out").exists()


def test_a_pickle_declared_as_a_data_file_never_reaches_a_sandbox(broker: BrokerProcess,
                                                                 tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_bytes(payloads.reduce_pickle("open('/tmp/airlock-carried-pwned', 'w')"))
    with Client(broker.address) as client, pytest.raises(ConversionError) as caught:
        client.convert(source, tmp_path / "out", declared_format="json")
    assert caught.value.reason == "FORMAT_MISMATCH" and "pickle" in caught.value.message


def test_data_files_that_are_not_what_their_names_say_are_skipped_by_their_sandboxes(
        broker: BrokerProcess, tmp_path: Path) -> None:
    """The client reads no data file: each goes to the broker as what its name says, and the
    ones refused as not that are skipped with the broker's reason; the rest are carried, each
    with its record, and the directory verifies."""
    model = hf_models.make_unsharded(tmp_path / "tiny")
    (model.path / "tokenizer_config.json").write_bytes(b'{"a": 1, "a": 2}')  # two meanings
    (model.path / "vocab.txt").write_bytes(payloads.reduce_pickle("open('/tmp/x', 'w')"))
    out = tmp_path / "tiny-safe"
    code, doc, stderr = _convert(model.path, out, broker=broker)
    assert code == 0, (doc, stderr)
    skipped = {s["name"]: s["why"] for s in doc["skipped"]}
    assert "not strict JSON" in skipped["tokenizer_config.json"], skipped
    assert "pickle" in skipped["vocab.txt"], skipped
    assert "config.json" in doc["carried"] and "vocab.txt" not in doc["carried"]
    assert not (out / "vocab.txt").exists() and not (out / "tokenizer_config.json").exists()
    verified = run_cli("verify", str(out), server=broker.address)
    assert verified.returncode == 0, verified.stdout + verified.stderr
