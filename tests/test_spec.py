import pytest
from conftest import REPO

from orchestrator.cli import main
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import apply_overrides, load_spec, validate_spec
from orchestrator.config.spec import JobSpec

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_jobs_folder_is_not_empty():
    assert len(JOBS) >= 5


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_validates_and_plans(job, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # the fine-tune jobs name ./runs/quickstart, the quickstart's run folder
    source_run = tmp_path / "runs" / "quickstart" / "checkpoint_best"
    source_run.mkdir(parents=True)
    (source_run / "checkpoint.pt").write_bytes(b"validate checks that it exists; train reads it")
    assert main(["validate", str(job)]) == 0
    assert main(["plan", str(job), "--json"]) == 0


def test_weights_from_a_run_not_trained_yet_are_named(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(REPO / "jobs" / "quickstart_finetune.yaml")]) == 2
    assert "model.weights: no such file or run folder runs/quickstart" in capsys.readouterr().err


# (job file text, a key the error must name)
BAD_JOBS = [
    ("optim:\n  base_lr: -0.1\n", "optim.base_lr: must be > 0"),
    ("optim:\n  name: sgdd\n", "optim.name: unknown value 'sgdd' (did you mean 'sgd'?)"),
    ("optim:\n  nam: sgd\n", "optim.nam: unknown key (did you mean 'name'?)"),
    ("modle:\n  arch: resnet18\n", "modle: unknown key (did you mean 'model'?)"),
    ("scaling:\n  per_worker_batch_size: 0\n", "scaling.per_worker_batch_size: must be >= 1"),
    ("schedule:\n  name: cosinee\n", "schedule.name: unknown value 'cosinee'"),
    ("schedule:\n  epochs: 3\n  warmup_epochs: 3\n", "schedule.warmup_epochs"),
    ("schedule:\n  name: multistep\n  epochs: 50\n  milestones: [30, 10]\n", "schedule.milestones: must be strictly increasing (got [30, 10])"),
    ("data:\n  augment: [hflip, flip_h]\n", "data.augment: unknown augmentation 'flip_h'"),
    ("data:\n  source: folder:/x\n", "data.source: unknown data source"),
    ("data:\n  val_fraction: 1.5\n", "data.val_fraction: must be < 1"),
    ("model:\n  head_init: he\n", "model.head_init: unknown value 'he'"),
    ("model:\n  num_classes: 1\n", "model.num_classes: must be >= 2"),
    ("model:\n  unfreeze_at_epoch: 2\n", "model.unfreeze_at_epoch: set, but model.freeze is empty"),
    ("optim:\n  name: adam\n  nesterov: true\n", "optim.nesterov"),
    ("optim:\n  name: sgd\n  switch_to_sgd_at_epoch: 2\n", "optim.switch_to_sgd_at_epoch"),
    ("optim:\n  param_groups:\n    - {match: 'fc.*', lr_mul: 10}\n", "optim.param_groups.0.lr_mul: unknown key (did you mean 'lr_mult'?)"),
    ("scaling:\n  amp: fp16\n", "scaling.amp: fp16 needs use_gpu"),
    ("model:\n  arch: resnet19\n", "model.arch: unknown architecture 'resnet19' (did you mean 'resnet18'?)"),
    ("model:\n  weights: missing/w.pth\n", "model.weights: no such file or run folder missing/w.pth"),
    ("model:\n  weights: IMAGENET1K_V9\n", "model.weights: 'IMAGENET1K_V9' is not a file, a run folder, or a torchvision weight"),
    ("seed: -1\n", "seed: must be >= 0 (got -1)"),
    ("optim:\n  base_lr: .inf\n", "optim.base_lr: must be a finite number (got inf)"),
    ("schedule:\n  gamma: .nan\n", "schedule.gamma: must be a finite number"),
    (f"name: {'x' * 300}\n", "name: at most 100 characters (got 300)"),
    ("data:\n  image_size: 100000\n", "data.image_size: must be <= 4096 (got 100000)"),
    ("scaling:\n  sync_bn: true\n", "scaling.sync_bn: torch's SyncBatchNorm runs on GPUs only"),
    ("name: 'my run/1'\n", "name: must be a folder name"),
    ("sweep:\n  space:\n    optim.base_l: {loguniform: [0.001, 0.1]}\n", "sweep.space.optim.base_l: not a job-file key (did you mean 'optim.base_lr'?)"),
    ("sweep:\n  space:\n    optim.base_lr: {loguniform: [0.1, 0.001]}\n", "sweep.space.optim.base_lr.loguniform"),
    ("optim: [sgd]\n", "optim: Input should be a valid dictionary"),
    ("", "the job file is empty"),
    ("- a\n- b\n", "must be a mapping of sections"),
    ("optim:\n  base_lr: 0.1\n   momentum: 0.9\n", "YAML syntax error at line 3"),
]


@pytest.mark.parametrize("text, expected", BAD_JOBS, ids=[b[1][:40] for b in BAD_JOBS])
def test_bad_job_exits_2_naming_the_key(text, expected, write_job, capsys):
    path = write_job(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_every_problem_gets_its_own_line(write_job, capsys):
    path = write_job("optim:\n  base_lr: -1\n  name: sgdd\nscaling:\n  num_workers: 0\n")
    assert main(["validate", str(path)]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 3
    assert any("optim.base_lr" in l for l in lines) and any("optim.name" in l for l in lines)
    assert any("scaling.num_workers" in l for l in lines)


def test_missing_job_file(capsys):
    assert main(["validate", "/nonexistent/job.yaml"]) == 2
    assert "no such job file" in capsys.readouterr().err


def test_overrides_are_typed_as_yaml(write_job):
    path = write_job("name: x\n")
    spec = load_spec(path, ["optim.base_lr=0.01", "model.freeze=[backbone]", "scaling.use_gpu=true",
                            "schedule.milestones=[2, 4]", "model.weights=null"])
    assert spec.optim.base_lr == 0.01
    assert spec.model.freeze == ["backbone"]
    assert spec.scaling.use_gpu is True
    assert spec.schedule.milestones == [2, 4]
    assert spec.model.weights is None


def test_override_of_unknown_key_is_named(write_job):
    with pytest.raises(SpecError) as info:
        load_spec(write_job("name: x\n"), ["optim.base_lrr=0.1"])
    assert info.value.problems == [info.value.problems[0]]
    assert info.value.problems[0].startswith("optim.base_lrr: unknown key (did you mean 'base_lr'?)")


def test_malformed_override():
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_overrides({}, ["optim.base_lr"])


def test_defaults_round_trip():
    spec = JobSpec()
    assert validate_spec(spec.to_dict()) == spec


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "space":
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_the_job_file_reference_documents_every_key():
    readme = (REPO / "docs" / "job-file.md").read_text()
    undocumented = [key for key in _leaf_keys(JobSpec().to_dict())
                    if f"`{key}`" not in readme and f"`{key.rsplit('.', 1)[-1]}`" not in readme]
    assert undocumented == []


def test_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    from orchestrator.store.storage import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    spec = validate_spec({"data": {"source": "imagefolder:./pics"}, "model": {"weights": "./runs/quickstart"},
                          "run": {"storage": "./runs"}})
    resolved = with_absolute_paths(spec)
    assert resolved.data.source == f"imagefolder:{tmp_path / 'pics'}"
    assert resolved.model.weights == str(tmp_path / "runs" / "quickstart")
    assert resolved.run.storage == str(tmp_path / "runs")
    assert with_absolute_paths(validate_spec({"model": {"weights": "IMAGENET1K_V1"}, "run": {"storage": "s3://b/runs"}})).model.weights == "IMAGENET1K_V1"
    assert with_absolute_paths(validate_spec({"run": {"storage": "s3://b/runs"}})).run.storage == "s3://b/runs"


def test_the_catalog_names_what_the_registries_build():
    """The spec validates names from catalog.py (no torch); the registries that build them hold the same names."""
    from orchestrator.config import catalog
    from orchestrator.train import models, optim

    assert set(catalog.HEAD_INIT_NAMES) == set(models.HEAD_INITS)
    assert set(catalog.OPTIMIZER_NAMES) == set(optim.OPTIMIZERS)
    assert set(catalog.ARCH_NAMES) <= set(models.classification_models())


def test_reading_a_job_file_imports_no_torch():
    """Every command reads its job file first; `train` then imports torch while Ray starts, not before it."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; import orchestrator.cli; from orchestrator.config.jobfile import load_spec; "
            "load_spec('jobs/quickstart.yaml', ['data.augment=[hflip, {name: color_jitter, brightness: 0.2}]']); "
            "print('torch' in sys.modules, 'torchvision' in sys.modules, 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False False False"
