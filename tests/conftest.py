"""Shared test helpers: nnU-Net folders in a temporary place and real command-line calls."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

# nnU-Net reads its worker count when first imported: one, as in the commands' environment (nnunet_environment)
os.environ.setdefault("nnUNet_def_n_proc", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from nnunetv2_pemma.environment import trainer_folder  # noqa: E402
from nnunetv2_pemma.training.seeding import SEED_ENV  # noqa: E402
from warm_commands import WarmCommands  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pytest-xdist's processes running the tests


def nnunet_environment(root: Path) -> dict[str, str]:
    """Environment for nnU-Net commands: private raw/preprocessed/results folders, our trainers, and the
    settings that keep nnU-Net quick on 2 CPU cores (one export worker, in-process augmentation)."""
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.update(nnUNet_extTrainer=str(trainer_folder()), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
               nnUNet_compile="false", PYTHONUNBUFFERED="1")
    if WORKERS > 1:  # tests run side by side (pytest-xdist): one thread each, which nnUNetv2_train would make all
        env.update(PEMMA_CPU_THREADS="1", OMP_NUM_THREADS="1")
    return env


# `pemma` commands run through the CLI's main in the test process: the same code as the console script (which calls
# main), without a fresh interpreter importing torch and nnU-Net (~7 s a call on 2 cores). Commands that start
# their own jobs or handle signals (conversion, reproduce, demo, compare) get a process, as nnU-Net's commands do:
# one forked from a process that has imported them (warm_commands.py) when tests run side by side.
IN_PROCESS = {"predict", "predict-risk", "predict-late-fusion", "apply-adapter", "plans", "evaluate",
              "evaluate-survival", "parameters", "env", "phantom", "check-alignment"}


def _pemma_in_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`pemma ARGS` with ENV as the whole environment, its output and exit code captured as a process's."""
    from nnunetv2_pemma.cli import main

    stdout, stderr, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(args[1:])
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


# nnUNetv2_predict in its own process only (-npp 0 -nps 0): each of its worker processes imports torch and nnU-Net
# again (a 1-case prediction took 8 CPU-s so, 15 with one worker each, 21 with the defaults). test_workflow's
# prediction keeps nnU-Net's default workers, as a user types the command.
IN_PROCESS_PREDICTION = ["-npp", "0", "-nps", "0"]


WARM_COMMANDS = WarmCommands(enabled=WORKERS > 1)  # commands with one thread each (nnunet_environment)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 1200,
            warm_children: bool = False) -> subprocess.CompletedProcess:
    """Run a console command of this venv (pemma, nnUNetv2_*) or `python SCRIPT` and capture its output.
    `warm_children`: the nnU-Net and pemma commands that the process starts itself are forked from the warm
    process too (`pemma reproduce`, the benchmarks)."""
    if args[0] == "pemma" and len(args) > 1 and args[1] in IN_PROCESS:
        return _pemma_in_process(args, env)
    if args[0] == "nnUNetv2_plan_and_preprocess":
        # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
        env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    if warm_children:
        args, env = WARM_COMMANDS.with_warm_children(args, env)
    return WARM_COMMANDS.run(args, env, timeout)  # nnU-Net's commands forked from a warm process, others plain


def run_ok(args: list[str], env: dict[str, str], timeout: float = 1200,
           warm_children: bool = False) -> subprocess.CompletedProcess:
    proc = run_cli(args, env, timeout, warm_children)
    assert proc.returncode == 0, (f"{' '.join(args)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-5000:]}"
                                  f"\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def first_case_inputs(images: Path, modalities: list[str], folder: Path) -> str:
    """The first case of a raw images folder (channels CT = 0, PET = 1) as a prediction input folder holding
    `modalities`, renumbered from _0000; returns the case id."""
    case = sorted(images.glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
    folder.mkdir(parents=True)
    for i, m in enumerate(modalities):
        (folder / f"{case}_{i:04d}.nii.gz").symlink_to(images / f"{case}_{['CT', 'PET'].index(m):04d}.nii.gz")
    return case


def train_step(net: torch.nn.Module, x: torch.Tensor, classes: int = 3) -> None:
    """One AdamW step over the trainable parameters on random labels: enough to see which weights move."""
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randint(0, classes, (x.shape[0], *x.shape[2:]))
    torch.nn.functional.cross_entropy(net(x), target).backward()
    optimizer.step()


def changed_keys(before: dict[str, torch.Tensor], net: torch.nn.Module) -> set[str]:
    return {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}


# Modules that start first when tests run side by side: the ones that build the shared workspaces, then the long
# ones that need none (pytest-xdist hands out modules in collection order, one at a time, per worker).
FIRST = ("test_peers_workflow.py", "test_workflow.py", "test_gpu_check.py", "test_pemma_cnn_workflow.py",
         "test_prognosis_workflow.py", "test_registration.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(FIRST)))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Reproducible unit tests that leave torch's thread count as they found it (one thread a test when tests run
    side by side)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2 if WORKERS == 1 else 1))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def nnunet_env(tmp_path: Path) -> dict[str, str]:
    return nnunet_environment(tmp_path)


CONFIG = "3d_unetr_tiny"
# the configurations of the shared workflow's datasets (501 -> 502, 503), all added when it is built: a test that
# adds another works on a copy (plans transfer re-preprocesses the target, under every test reading it)
SHARED_PRESETS = ("tiny", "unet_tiny")
CNN_BASE_PRESET = "unet_tiny_base"  # the CNN forms' CT base (501 only): long enough to segment the phantom


def checkpoint_of(env: dict[str, str], dataset: str, trainer: str) -> Path:
    return (Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
            / "checkpoint_final.pth")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


KEEP_WORKSPACES = "PEMMA_TEST_WORKSPACES"  # a folder that keeps the shared workspaces from one run to the next


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict]) -> dict:
    """`build(root)` once per test run, also across pytest-xdist's workers (their temporary folders share a
    parent): the first to ask builds under a lock, the others wait and read what it returned (paths under root,
    and strings), with the workspace's `root` and its nnU-Net environment `env`. A build that failed is not tried
    again. With PEMMA_TEST_WORKSPACES=DIR the workspaces live in DIR and are reused by later runs (delete them
    after changing what they are built with)."""
    base = tmp_path_factory.getbasetemp()
    if WORKERS > 1:
        base = base.parent
    base = Path(os.environ.get(KEEP_WORKSPACES) or base)
    base.mkdir(parents=True, exist_ok=True)
    root, record, started = (base / name, base / f"{name}.json",
                             base / f"{name}.{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}.started")
    with FileLock(str(base / f"{name}.lock")):
        if not record.exists():
            if started.exists():
                pytest.fail(f"building the shared workspace {name} failed earlier in this run")
            started.touch()
            shutil.rmtree(root, ignore_errors=True)  # what a failed or interrupted earlier build left
            root.mkdir()
            built = build(root)
            record.write_text(json.dumps({k: {"path": str(v.relative_to(root))} if isinstance(v, Path) else v
                                          for k, v in built.items()}))
    built = {k: root / v["path"] if isinstance(v, dict) and set(v) == {"path"} else v
             for k, v in json.loads(record.read_text()).items()}
    return {**built, "root": root, "env": nnunet_environment(root)}


def _link_checkpoints(source: str, target: str) -> None:
    """Checkpoints and adapter files are hard-linked (nothing rewrites an existing one), the rest copied."""
    if source.endswith((".pth", ".safetensors")):
        os.link(source, target)
    else:
        shutil.copy2(source, target)


def workspace_copy(workspace: dict, folder: Path) -> dict:
    """A private copy of a shared workspace, for a test that adds a dataset, a configuration or a fold: the
    workspace's files under FOLDER, and every path and nnU-Net folder of it pointed there. Shared workspaces
    stay as built, whatever order the tests run in and whichever runs beside them. (A file that a refused
    command beside it created and removed while it was copied is not an error.)"""
    source = workspace["root"]
    try:
        shutil.copytree(source, folder, symlinks=True, copy_function=_link_checkpoints, dirs_exist_ok=True)
    except shutil.Error as e:
        failed = [error for error in e.args[0] if Path(error[0]).exists()]
        if failed:
            raise shutil.Error(failed) from None
    moved = {k: folder / v.relative_to(source) if isinstance(v, Path) and v.is_relative_to(source) else v
             for k, v in workspace.items()}
    return {**moved, "root": folder, "env": {**workspace["env"], **nnunet_environment(folder)}}


@pytest.fixture
def own_workflow(workflow: dict, tmp_path: Path) -> dict:
    """The session's workflow, copied for one test that adds to it."""
    return workspace_copy(workflow, tmp_path / "workspace")


@pytest.fixture(scope="session")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README workflow through nnU-Net's commands on phantom data (tiny preset), run once per session:
    CT base (501) -> PEMMA adaptation on MDA CT+PET (502) -> LoRA-only continual update on HGJ CT (503).
    Read-only to tests: one that adds a dataset, configuration or fold works on `workspace_copy`."""
    return built_once(tmp_path_factory, "workflow", _build_workflow)


def _build_workflow(root: Path) -> dict:
    env = nnunet_environment(root)
    data = root / "hecktor"
    run_ok(["pemma", "phantom", str(data), "--cases-per-center", "5", "--labelled-test-cases-per-center", "2",
            "--seed", "3"], env)

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "501", "--name", "HNC_CT",
            "--centers", "CHUM", "CHUP", "CHUS", "CHUV", "--modalities", "CT"], env)
    run_ok(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "--verify_dataset_integrity",
            "-np", "1", "-npfp", "1"], env)
    for preset in (*SHARED_PRESETS, CNN_BASE_PRESET):
        run_ok(["pemma", "plans", "add", "501", "--preset", preset], env)
    base_log = run_ok(["nnUNetv2_train", "501", CONFIG, "0", "-tr", "UNETRTrainer", "-device", "cpu"], env)
    base = checkpoint_of(env, "Dataset501_HNC_CT", "UNETRTrainer")

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "502", "--name", "HNC_CTPET_MDA",
            "--centers", "MDA", "--modalities", "CT", "PET"], env)
    for preset in SHARED_PRESETS:
        run_ok(["pemma", "plans", "transfer", "501", "502", "--preset", preset], env)
    run_ok(["nnUNetv2_train", "502", CONFIG, "0", "-tr", "PEMMATrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    adapted = checkpoint_of(env, "Dataset502_HNC_CTPET_MDA", "PEMMATrainer")

    run_ok(["pemma", "convert-hecktor", str(data), "--dataset-id", "503", "--name", "HNC_CT_HGJ",
            "--centers", "HGJ", "--modalities", "CT"], env)
    for preset in SHARED_PRESETS:
        run_ok(["pemma", "plans", "transfer", "501", "503", "--preset", preset], env)
    run_ok(["nnUNetv2_train", "503", CONFIG, "0", "-tr", "PEMMAContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    continual = checkpoint_of(env, "Dataset503_HNC_CT_HGJ", "PEMMAContinualTrainer")
    return {"base": base, "adapted": adapted, "continual": continual, "base_log": base_log.stdout}


CNN_CONFIG, CNN_BASE_CONFIG = "3d_fullres_unet_tiny", "3d_fullres_unet_tiny_base"
CTPET_MDA, CT_HGJ = "Dataset502_HNC_CTPET_MDA", "Dataset503_HNC_CT_HGJ"


def cnn_checkpoint(env: dict[str, str], dataset: str, trainer: str, config: str = CNN_CONFIG) -> Path:
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__{config}" / "fold_0" / \
        "checkpoint_final.pth"


@pytest.fixture(scope="session")
def cnn_models(workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CNN forms on the workflow's datasets (unet_tiny preset): a CT base of nnU-Net's U-Net
    (nnUNetPresetTrainer on 501's CT, unet_tiny_base) -> PEMMACNNTrainer on MDA CT+PET (502) ->
    PEMMACNNContinualTrainer on HGJ CT (503); nnUNetChannelDropoutTrainer from scratch and EarlyFusionCNNTrainer
    from the base on 502. Used by the CNN tests and the peer table's rows. Trained once into a copy of the workflow
    (which it holds too), read-only to tests."""
    return {**built_once(tmp_path_factory, "cnn_models", lambda root: _build_cnn_models(workflow, root)),
            "unetr_base": workflow["base"]}


def _build_cnn_models(workflow: dict, root: Path) -> dict:
    # seeded: the Dice floor of test_pemma_cnn_workflow is set from a measured run of these models
    env = {**workspace_copy(workflow, root)["env"], SEED_ENV: "0"}
    run_ok(["nnUNetv2_train", "501", CNN_BASE_CONFIG, "0", "-tr", "nnUNetPresetTrainer", "-device", "cpu"], env)
    base = cnn_checkpoint(env, "Dataset501_HNC_CT", "nnUNetPresetTrainer", CNN_BASE_CONFIG)
    run_ok(["nnUNetv2_train", "502", CNN_CONFIG, "0", "-tr", "PEMMACNNTrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    adapted = cnn_checkpoint(env, CTPET_MDA, "PEMMACNNTrainer")
    run_ok(["nnUNetv2_train", "503", CNN_CONFIG, "0", "-tr", "PEMMACNNContinualTrainer", "-device", "cpu",
            "-pretrained_weights", str(adapted)], env)
    run_ok(["nnUNetv2_train", "502", CNN_CONFIG, "0", "-tr", "nnUNetChannelDropoutTrainer", "-device", "cpu"], env)
    run_ok(["nnUNetv2_train", "502", CNN_CONFIG, "0", "-tr", "EarlyFusionCNNTrainer", "-device", "cpu",
            "-pretrained_weights", str(base)], env)
    return {"base": base, "adapted": adapted,
            "continual": cnn_checkpoint(env, CT_HGJ, "PEMMACNNContinualTrainer"),
            "dropout": cnn_checkpoint(env, CTPET_MDA, "nnUNetChannelDropoutTrainer"),
            "fusion": cnn_checkpoint(env, CTPET_MDA, "EarlyFusionCNNTrainer")}


@pytest.fixture(scope="session")
def reproduction(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`pemma reproduce --scope demo` and then `pemma compare` at the tiny presets on a small phantom, end to end in
    one folder (compare reuses the reproduction's CT base, PEMMA and early fusion): the peer table's models and
    the commands' own tables, built once, read-only to tests."""
    return built_once(tmp_path_factory, "reproduction", _build_reproduction)


def _build_reproduction(root: Path) -> dict:
    env = nnunet_environment(root)  # the nnU-Net folders the commands make under --out
    common = ["--phantom", "--preset", "tiny", "--out", str(root), "--cases-per-center", "5",
              "--labelled-test-cases-per-center", "2", "--cpu-jobs", str(1 if WORKERS > 1 else 2)]
    reproduce = run_ok(["pemma", "reproduce", "--scope", "demo", *common], env, timeout=2400, warm_children=True)
    compare = run_ok(["pemma", "compare", *common], env, timeout=2400, warm_children=True)
    return {"reproduce_stdout": reproduce.stdout, "compare_stdout": compare.stdout}


def assert_conversion_interrupted(proc, stderr, why: str, raw: Path) -> None:
    """A `pemma convert-hecktor` stopped by a signal: exit code 2, one line saying so on stderr (the open file the
    process wrote), no traceback, nothing left in nnUNet_raw."""
    assert proc.wait(timeout=120) == 2
    stderr.seek(0)
    err = stderr.read()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"pemma convert-hecktor: error: interrupted ({why}); the unfinished "
                                            f"dataset and its lock were removed")
    assert list(raw.iterdir()) == []
