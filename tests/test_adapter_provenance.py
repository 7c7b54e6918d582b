"""Which CT base an adapter belongs to, and what `pemma apply-adapter` refuses.

An adapter records the fingerprint of the frozen CT base it was trained on; apply-adapter refuses any other base
(even one differing by 1e-6 in one weight) unless --force, an existing --out unless --overwrite (then it replaces
the folder as a whole), and reports unreadable inputs in one line with exit code 2. The slow tests use the
session's real nnU-Net trainings (conftest's `workflow`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import CONFIG, changed_keys, run_ok, train_step, weights
from networks_helpers import TINY_PRESETS, Tiny, perturb
from nnunetv2_pemma.adaptation.files import ADAPTER_FILE, read_adapter, save_adapter
from nnunetv2_pemma.adaptation.methods import is_added, train_only
from nnunetv2_pemma.adaptation.provenance import BASE_FILE_KEY, FINGERPRINT_KEY, PEMMA_BASE_KEY, base_fingerprint
from nnunetv2_pemma.cli import main

ERROR = "pemma apply-adapter: error: "
WARNING = "pemma apply-adapter: warning: "


# --- the fingerprint --------------------------------------------------------------------------------------------


def small_state_dict() -> dict[str, torch.Tensor]:
    return {"vit.norm.weight": torch.randn(4), "out.conv.weight": torch.randn(2, 3).t(),  # not contiguous
            "vit.steps": torch.tensor(7), "vit.mask": torch.tensor([True, False])}


def test_base_fingerprint_is_sha256_of_names_dtypes_shapes_and_bytes() -> None:
    state = small_state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(f"{name}|{state[name].dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    assert base_fingerprint(state) == digest.hexdigest()


def test_base_fingerprint_ignores_adapter_tensors_and_sees_every_bit() -> None:
    state = small_state_dict()
    reference = base_fingerprint(state)
    adapters = {"vit.blocks.0.attn.qkv.lora_A_q": torch.randn(2, 4), "pet_beta": torch.zeros(1)}
    assert all(is_added(k) for k in adapters)
    assert base_fingerprint({**state, **adapters}) == reference
    for name in ("vit.norm.weight", "out.conv.weight"):
        for bit in (0, 31):  # the last bit of the mantissa, the sign
            flipped = state[name].contiguous().clone()
            flipped.view(torch.int32).view(-1)[-1] ^= 1 << bit if bit < 31 else -(1 << 31)
            assert base_fingerprint({**state, name: flipped}) != reference, (name, bit)
    assert base_fingerprint({**state, "vit.steps": torch.tensor(7, dtype=torch.int32)}) != reference  # dtype
    assert base_fingerprint({**state, "vit.norm.weight": state["vit.norm.weight"].reshape(2, 2)}) != reference
    renamed = {("vit.norm2.weight" if k == "vit.norm.weight" else k): v for k, v in state.items()}
    assert base_fingerprint(renamed) != reference


@pytest.mark.parametrize("backbone", list(TINY_PRESETS))
def test_save_adapter_records_the_frozen_ct_base(backbone: str, tmp_path: Path) -> None:
    """A PEMMA network's base tensors carry the CT network's names and values, before and after training, so the
    fingerprint save_adapter records from the trained network is the CT base checkpoint's."""
    tiny = Tiny.of(backbone)
    base = tiny.base()
    perturb(base, "", std=0.05)  # a trained base, not the initialisation
    net = tiny.adapted(base)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_only(net, "adaptation")
    train_step(net, tiny.image(2, batch=1))
    assert changed_keys(before, net) and all(is_added(k) for k in changed_keys(before, net))
    kwargs = dict(trainer_name="PEMMATrainer", configuration="c", plans={}, dataset_json={}, mirroring_axes=(0, 1))
    meta = read_adapter(save_adapter(net.state_dict(), tmp_path / "a.safetensors", **kwargs))[1]
    assert meta[FINGERPRINT_KEY] == base_fingerprint(base.state_dict()) and BASE_FILE_KEY not in meta
    meta = read_adapter(save_adapter(net.state_dict(), tmp_path / "b.safetensors", base_file="/ct/base.pth",
                                     **kwargs))[1]
    assert meta[FINGERPRINT_KEY] == base_fingerprint(base.state_dict()) and meta[BASE_FILE_KEY] == "/ct/base.pth"


# --- one-line errors before anything is written (no nnU-Net run needed) ------------------------------------------


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run `pemma ARGV` in this process; the one stderr line of its error (exit code 2, no traceback)."""
    with warnings.catch_warnings():  # the CLI changes how warnings are shown
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(ERROR), err
    return err.strip()


@pytest.fixture
def dummies(tmp_path: Path) -> dict[str, Path]:
    """A file of each kind apply-adapter may be given by mistake."""
    checkpoint, adapter, text = tmp_path / "ct.pth", tmp_path / "a.safetensors", tmp_path / "notes.txt"
    torch.save({"network_weights": {"vit.norm.weight": torch.ones(4)}}, checkpoint)
    save_file({"pet_beta": torch.zeros(1)}, str(adapter), metadata={"trainer_name": "PEMMATrainer"})
    text.write_text("not a checkpoint\n")
    return {"checkpoint": checkpoint, "adapter": adapter, "text": text, "missing": tmp_path / "missing.pth",
            "folder": tmp_path}


@pytest.mark.parametrize("base, adapter, expected", [
    ("missing", "adapter", "CT base checkpoint {base} does not exist"),
    ("folder", "adapter", "CT base checkpoint {base} is not a file"),
    ("text", "adapter", "{base}: cannot be read as a PyTorch checkpoint (UnpicklingError: "),
    ("adapter", "adapter", "{base}: "),  # torch reads it as an empty legacy file, or fails to: either one line
    ("checkpoint", "missing", "adapter {adapter} does not exist"),
    ("checkpoint", "checkpoint", "{adapter}: not a readable safetensors adapter (SafetensorError: "),
    ("checkpoint", "adapter", "{adapter}: adapter metadata lacks ['configuration', 'dataset_json', 'plans']"),
])
def test_unusable_inputs_are_one_line_errors(dummies: dict[str, Path], base: str, adapter: str, expected: str,
                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "merged"
    line = cli_error(["apply-adapter", "--base", str(dummies[base]), "--adapter", str(dummies[adapter]),
                      "--out", str(out)], capsys)
    assert expected.format(base=dummies[base], adapter=dummies[adapter]) in line
    assert not out.parent.exists()


def test_an_out_folder_holding_an_input_is_refused(dummies: dict[str, Path], capsys: pytest.CaptureFixture
                                                   ) -> None:
    """--overwrite would replace the folder as a whole, deleting the adapter it was given."""
    folder = dummies["folder"]
    line = cli_error(["apply-adapter", "--base", str(dummies["checkpoint"]), "--adapter", str(dummies["adapter"]),
                      "--out", str(folder), "--overwrite"], capsys)
    assert line == f"{ERROR}model folder {folder} holds {dummies['checkpoint']}, which it would replace; write it " \
                   f"elsewhere"
    assert dummies["adapter"].is_file()


# --- with the session's real trainings --------------------------------------------------------------------------


def adapter_of(workflow: dict) -> Path:
    return workflow["adapted"].parent / ADAPTER_FILE


def apply(workflow: dict, base: Path, adapter: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`pemma apply-adapter` through the CLI's main in this process, with the workflow's nnU-Net folders (a
    process per call would mostly time torch's import)."""
    args = ["apply-adapter", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *flags]
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in workflow["env"].items():
            if name.startswith("nnUNet_"):  # nnU-Net finds the trainer class through nnUNet_extTrainer
                patch.setenv(name, value)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
    return subprocess.CompletedProcess(["pemma", *args], code, "", stderr.getvalue())


def one_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The one stderr line starting with `prefix` (an error also means exit code 2 and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    if prefix == ERROR:
        assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def fingerprint_of(checkpoint: Path) -> str:
    return base_fingerprint(weights(checkpoint))


def perturbed_base(workflow: dict, path: Path) -> Path:
    """The CT base with one weight changed by 1e-6: another base, which loads without complaint."""
    checkpoint = torch.load(workflow["base"], map_location="cpu", weights_only=False)
    tensor = checkpoint["network_weights"]["vit.norm.weight"]
    before = tensor.clone()
    tensor.view(-1)[0] += 1e-6
    assert not torch.equal(tensor, before)
    torch.save(checkpoint, path)
    return path


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_written(out: Path) -> None:
    """Neither the model folder nor a staging folder (.NAME.*) next to it."""
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.slow
def test_the_matching_base_applies_and_is_recorded(workflow: dict, tmp_path: Path) -> None:
    """(test_workflow checks that the weights equal the adapted checkpoint's.)"""
    out = tmp_path / "merged"
    proc = apply(workflow, workflow["base"], adapter_of(workflow), out)
    assert proc.returncode == 0 and WARNING not in proc.stderr, proc.stderr
    assert sorted(files_in(out)) == ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    checkpoint = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    record = {FINGERPRINT_KEY: fingerprint_of(workflow["base"]), BASE_FILE_KEY: str(workflow["base"].resolve())}
    assert checkpoint["init_args"][PEMMA_BASE_KEY] == record
    assert base_fingerprint(checkpoint["network_weights"]) == record[FINGERPRINT_KEY]
    trained = torch.load(workflow["adapted"], map_location="cpu", weights_only=False)["init_args"]
    if PEMMA_BASE_KEY in trained:  # recorded by the PEMMA trainers
        assert trained[PEMMA_BASE_KEY][FINGERPRINT_KEY] == record[FINGERPRINT_KEY]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging folder left


@pytest.mark.slow
def test_another_base_is_refused_naming_both_files(workflow: dict, tmp_path: Path) -> None:
    base = perturbed_base(workflow, tmp_path / "other_ct.pth")
    out = tmp_path / "merged"
    line = one_line(apply(workflow, base, adapter_of(workflow), out), ERROR)
    recorded = read_adapter(adapter_of(workflow))[1]
    recorded_file = f"{recorded[BASE_FILE_KEY]}, " if BASE_FILE_KEY in recorded else ""
    assert line == (f"{ERROR}adapter {adapter_of(workflow)} was trained on another CT base (recorded: "
                    f"{recorded_file}fingerprint {fingerprint_of(workflow['base'])[:12]}…) than {base} (fingerprint "
                    f"{fingerprint_of(base)[:12]}…); pass --force to apply it anyway")
    assert_nothing_written(out)


@pytest.mark.slow
def test_a_second_training_of_the_same_network_is_another_base(own_workflow: dict, tmp_path: Path) -> None:
    """A CT base of the same trainer, configuration and data (fold 1 of the base's run, in a copy of the workflow):
    as good a base as any, and not the one the adapter was trained on."""
    run_ok(["nnUNetv2_train", "501", CONFIG, "1", "-tr", "UNETRTrainer", "-device", "cpu"], own_workflow["env"])
    second = own_workflow["base"].parent.parent / "fold_1" / "checkpoint_final.pth"
    assert fingerprint_of(second) != fingerprint_of(own_workflow["base"])
    out = tmp_path / "merged"
    line = one_line(apply(own_workflow, second, adapter_of(own_workflow), out), ERROR)
    assert str(second) in line and str(adapter_of(own_workflow)) in line and "was trained on another CT base" in line
    assert_nothing_written(out)


@pytest.mark.slow
def test_force_applies_another_base_with_a_warning(workflow: dict, tmp_path: Path) -> None:
    base = perturbed_base(workflow, tmp_path / "other_ct.pth")
    out = tmp_path / "merged"
    proc = apply(workflow, base, adapter_of(workflow), out, "--force")
    assert proc.returncode == 0, proc.stderr
    line = one_line(proc, WARNING)
    assert line.startswith(f"{WARNING}adapter {adapter_of(workflow)} was trained on another CT base (recorded: ")
    assert line.endswith(f"than {base} (fingerprint {fingerprint_of(base)[:12]}…); applying it anyway (--force)")
    checkpoint = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"][PEMMA_BASE_KEY] == {FINGERPRINT_KEY: fingerprint_of(base),
                                                       BASE_FILE_KEY: str(base.resolve())}
    assert all(torch.equal(checkpoint["network_weights"][k], v) for k, v in weights(base).items())


def rewritten_adapter(workflow: dict, path: Path, drop: str | None = None, **extra: str) -> Path:
    """The trained adapter with metadata key `drop` left out and `extra` entries added."""
    tensors, meta = read_adapter(adapter_of(workflow))
    meta = {k: v for k, v in meta.items() if k != drop}
    save_file(tensors, str(path), metadata={**meta, **extra})
    return path


@pytest.mark.slow
def test_the_recorded_base_file_is_named(workflow: dict, tmp_path: Path) -> None:
    """The adapter save_adapter writes with base_file (as the trainers do) names it when refusing another base."""
    adapted = torch.load(workflow["adapted"], map_location="cpu", weights_only=False)
    tensors, meta = read_adapter(adapter_of(workflow))
    adapter = save_adapter(adapted["network_weights"], tmp_path / ADAPTER_FILE, trainer_name=meta["trainer_name"],
                           configuration=meta["configuration"], plans=json.loads(meta["plans"]),
                           dataset_json=json.loads(meta["dataset_json"]),
                           mirroring_axes=json.loads(meta["inference_allowed_mirroring_axes"]),
                           base_file="/data/ct/checkpoint_final.pth")
    assert read_adapter(adapter)[0].keys() == tensors.keys()
    base = perturbed_base(workflow, tmp_path / "other_ct.pth")
    line = one_line(apply(workflow, base, adapter, tmp_path / "refused"), ERROR)
    assert (f"adapter {adapter} was trained on another CT base (recorded: /data/ct/checkpoint_final.pth, "
            f"fingerprint {fingerprint_of(workflow['base'])[:12]}…) than {base} (fingerprint") in line
    assert apply(workflow, workflow["base"], adapter, tmp_path / "merged").returncode == 0


@pytest.mark.slow
def test_an_adapter_without_a_recorded_base_is_refused(workflow: dict, tmp_path: Path) -> None:
    """Adapters of earlier releases record no fingerprint: even the right base cannot be told from another."""
    adapter = rewritten_adapter(workflow, tmp_path / "old.safetensors", drop=FINGERPRINT_KEY)
    out = tmp_path / "merged"
    line = one_line(apply(workflow, workflow["base"], adapter, out), ERROR)
    assert line == (f"{ERROR}adapter {adapter} records no CT base (written by an earlier release), so it cannot be "
                    f"checked against {workflow['base']} (fingerprint {fingerprint_of(workflow['base'])[:12]}…); "
                    f"pass --force to apply it anyway")
    assert_nothing_written(out)
    proc = apply(workflow, workflow["base"], adapter, out, "--force")
    assert proc.returncode == 0 and "records no CT base" in one_line(proc, WARNING)
    assert (out / "fold_0" / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_an_existing_out_is_refused_and_overwrite_replaces_it_whole(workflow: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    (out / "fold_0").mkdir(parents=True)
    for name, content in {"plans.json": b"{}", "fold_0/checkpoint_final.pth": b"old final",
                          "fold_0/checkpoint_best.pth": b"old best"}.items():
        (out / name).write_bytes(content)
    old = files_in(out)
    line = one_line(apply(workflow, workflow["base"], adapter_of(workflow), out), ERROR)
    assert line == f"{ERROR}model folder {out} already exists; pass --overwrite to replace it"
    assert files_in(out) == old
    proc = apply(workflow, workflow["base"], adapter_of(workflow), out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(files_in(out)) == ["dataset.json", "fold_0/checkpoint_final.pth", "plans.json"]
    assert weights(out / "fold_0" / "checkpoint_final.pth").keys() == weights(workflow["adapted"]).keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or .old folder left


SIGTERM_IN_STAGING = """
import os, signal, sys
from nnunetv2_pemma.adaptation import files
from nnunetv2_pemma.cli import main

def terminated(staged, *args, **kwargs):  # the staged folder is complete and validated: the last moment
    assert (staged / "fold_0" / "checkpoint_final.pth").is_file()
    os.kill(os.getpid(), signal.SIGTERM)

files.replace_folder = terminated
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_sigterm_while_staging_leaves_nothing(workflow: dict, tmp_path: Path, existing: bool) -> None:
    """A job killer's SIGTERM after nnU-Net validated the staged folder, before it replaces --out: no staging
    folder is left, and --out is as it was (absent, or with --overwrite its old files)."""
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    if existing:
        (out / "fold_0").mkdir(parents=True)
        (out / "fold_0" / "checkpoint_best.pth").write_bytes(b"old best")
    old = files_in(out)  # {} when absent
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_STAGING, "apply-adapter", "--base",
                           str(workflow["base"]), "--adapter", str(adapter_of(workflow)), "--out", str(out),
                           "--overwrite"], env=workflow["env"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # not the repository root: `-c` would import the source tree
    line = one_line(proc, ERROR)
    assert line == f"{ERROR}interrupted (terminated by signal 15); model folder {out} left as it was"
    assert [p.name for p in out.parent.iterdir()] == (["merged"] if existing else [])
    assert files_in(out) == old
