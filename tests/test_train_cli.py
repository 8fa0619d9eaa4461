"""``tuckerman train``: the reference models, the training library and the console command.

Smoke runs use ``--subset`` / ``--max-steps``; the report is checked against the saved model
(ranks and parameter counts recomputed from its state dict, accuracy re-evaluated), the plots
are read back as PNGs, bad options must exit with status 2 naming the value. The main job
(defaults, two epochs) is the one slow test.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
from torch import nn  # noqa: E402
from train_helpers import dense_weights, read_report, without_times  # noqa: E402
from tuckerman.integrations.torch import (  # noqa: E402
    AbstractTuckerLayer,
    TrainConfig,
    build_model,
    compression_report,
    lenet5,
    train,
)
from tuckerman.integrations.torch._cli import main  # noqa: E402
from tuckerman.integrations.torch._train import (  # noqa: E402
    ConfigError,
    evaluate,
    load_data,
    make_model,
)
from tuckerman.integrations.torch._train._report import percent_compression  # noqa: E402

torch.set_num_threads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, *args: str, name: str = "run") -> dict:
    out = tmp_path / name
    status = main(["train", "--no-progress", "--out", str(out), *args])
    assert status == 0
    return read_report(out)


def _without_times(report: dict) -> dict:
    """The report without measured times and the fields that name the output folder."""
    value = without_times(report, drop=("out", "resume"))
    return value


@pytest.fixture
def rgb_npz(tmp_path):
    """60 random 32×32 RGB images (uint8, channels last) with labels 0..3."""
    rng = np.random.default_rng(0)
    path = tmp_path / "rgb.npz"
    np.savez(
        path,
        images=rng.integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8),
        labels=rng.integers(0, 4, size=60),
    )
    return path


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["lenet5", "vgg-small", "resnet18"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_models_map_images_to_logits(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 7, size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_lenet5_is_the_papers_lenet5():
    layers = [m for m in lenet5().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    shapes = [tuple(m.weight.shape) for m in layers]
    assert shapes == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]


def test_resnet18_has_the_cifar_resnet18_size():
    # 11,173,962 parameters for CIFAR-10 (3 channels, 10 classes), as in the usual CIFAR code
    n = sum(p.numel() for p in build_model("resnet18", 3, 10, 32).parameters())
    assert n == 11_173_962


def test_build_model_rejects_unknown_names_and_sizes():
    with pytest.raises(ValueError, match="'vgg16'.*lenet5"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="image_size must be at least 16, got 8"):
        build_model("lenet5", 1, 10, 8)
    with pytest.raises(ValueError, match="in_channels must be an integer >= 1, got 0"):
        build_model("vgg-small", 0)


# --------------------------------------------------------------------------- smoke runs
def _check_report(report: dict, out) -> None:
    """The report agrees with the saved model, recomputed independently."""
    config = TrainConfig(**report["config"])
    data = load_data(config)
    model = make_model(config, data, torch.device("cpu"))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    tucker = {n: m for n, m in model.named_modules() if isinstance(m, AbstractTuckerLayer)}
    assert report["ranks"] == {n: list(m.ranks) for n, m in tucker.items()}
    params = dense = 0
    for m in tucker.values():  # counted here from the true ranks (the layers may be padded)
        bias = m.bias.numel() if m.bias is not None else 0
        r = m.ranks
        params += math.prod(r) + sum(n * k for n, k in zip(m.weight_shape, r)) + bias
        dense += math.prod(m.weight_shape) + bias
    expected_cr = 1 - params / dense if tucker else 0.0
    assert report["compression_rate_percent"] == pytest.approx(100 * expected_cr, abs=1e-10)
    assert report["compression"] == percent_compression(compression_report(model))
    in_tucker = {id(p) for m in tucker.values() for p in m.parameters()}
    others = sum(p.numel() for p in model.parameters() if id(p) not in in_tucker)
    assert report["parameters"] == params + others  # Tucker layers at their true ranks
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, torch.device("cpu"))
    assert report["test_accuracy_percent"] == pytest.approx(100 * test_acc, abs=1e-10)
    assert report["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert report["status"] == "finished" and report["null_reasons"] == {}
    last = report["history"][-1]
    assert last["test_accuracy_percent"] == report["test_accuracy_percent"]
    assert last["ranks"] == report["ranks"]
    assert last["compression_rate_percent"] == report["compression_rate_percent"]
    # metrics.jsonl: the history, one strict-JSON line per epoch
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == report["history"]
    # the rank history counts the steps
    assert [h["step"] for h in report["rank_history"]] == list(
        range(1, len(report["rank_history"]) + 1)
    )
    assert sorted(report["files"]) == sorted(
        ["report.json", "metrics.jsonl", "checkpoint.pt", "model.pt", *report["plots"]]
    )
    for png in report["plots"]:
        data_bytes = (out / png).read_bytes()
        assert data_bytes.startswith(PNG_SIGNATURE)
        import matplotlib.image

        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100


@pytest.mark.parametrize("method", ["tdlrt", "tucker-fixed", "dense"])
def test_cli_smoke_run_per_method(tmp_path, method):
    args = ["--method", method, "--subset", "200", "--epochs", "2", "--batch-size", "50"]
    if method != "dense":
        args += ["--ranks", "12" if method == "tucker-fixed" else "0.1"]
    before = torch.get_num_threads()
    report = _run(tmp_path, *args, "--threads", "2" if method == "dense" else "1")
    assert report["threads"] == (2 if method == "dense" else 1)
    assert torch.get_num_threads() == before  # restored after the run
    for key in ("test_accuracy_percent", "compression_rate_percent", "ranks", "history"):
        assert key in report
    assert report["seed"] == 0 and report["config"]["method"] == method
    assert report["versions"]["torch"] == torch.__version__
    assert len(report["history"]) == 2 and report["steps"] == report["total_steps"] == 8
    for entry in report["history"]:
        for key in ("train_loss", "test_accuracy_percent", "compression_rate_percent", "ranks"):
            assert key in entry
        assert entry["train_time_s"] > 0 and entry["eval_time_s"] > 0
    assert report["data"]["train_size"] == 200 and report["data"]["test_size"] == 200
    _check_report(report, tmp_path / "run")
    if method == "dense":
        assert report["ranks"] == {} and report["compression_rate_percent"] == 0.0
        assert report["config"]["tau"] is None and report["config"]["init"] is None
        assert report["plots"] == ["accuracy.png"]
        return
    assert set(report["ranks"]) == {"features.3", "classifier.1"}  # first conv, last fc dense
    assert report["plots"] == ["accuracy.png", "ranks.png"]
    assert len(report["rank_history"]) == report["steps"]
    if method == "tucker-fixed":
        assert report["ranks"] == {"features.3": [12, 12, 5, 5], "classifier.1": [12, 12]}
        assert all(h["ranks"] == report["ranks"] for h in report["rank_history"])
        assert report["config"]["tau"] is None
    else:  # TDLRT's ranks move from the initial ones (a tenth of full rank: 5x2, 50x50)
        assert report["ranks"] != {"features.3": [5, 2, 5, 5], "classifier.1": [50, 50]}
        assert 0 < report["compression_rate_percent"] < 100
        assert report["config"]["tau"] == 0.14


@pytest.mark.parametrize("model", ["vgg-small", "resnet18"])
def test_cli_smoke_run_rgb_models(tmp_path, rgb_npz, model):
    report = _run(
        tmp_path,
        *("--model", model, "--data", str(rgb_npz), "--max-steps", "2", "--batch-size", "8"),
        *("--ranks", "8"),
    )
    assert report["data"]["image_shape"] == [3, 32, 32]
    assert report["data"]["train_size"] == 48 and report["data"]["test_size"] == 12
    assert report["data"]["num_classes"] == 4
    assert report["steps"] == 2 and len(report["history"]) == 1
    assert len(report["ranks"]) > 3
    _check_report(report, tmp_path / "run")


def test_one_pass_and_adam_run(tmp_path):
    report = _run(
        tmp_path,
        *("--subset", "100", "--max-steps", "3", "--one-pass", "--inner", "adam", "--ranks", "16"),
        *("--threads", "auto"),
    )
    assert report["config"]["one_pass"] and report["config"]["inner"] == "adam"
    assert report["config"]["momentum"] is None  # Adam has no momentum option
    assert report["config"]["threads"] is None and report["threads"] == torch.get_num_threads()
    _check_report(report, tmp_path / "run")


def test_same_seed_same_report_other_seed_other_report(tmp_path):
    args = ("--subset", "160", "--epochs", "2", "--batch-size", "40", "--ranks", "16")
    a = _run(tmp_path, *args, name="a")
    b = _run(tmp_path, *args, name="b")
    c = _run(tmp_path, *args, "--seed", "1", name="c")
    a, b, c = (_without_times(r) for r in (a, b, c))
    assert a == b
    assert a["history"] != c["history"]


def test_history_lengths_follow_epochs_and_max_steps(tmp_path):
    report = train(
        TrainConfig(
            subset=64, epochs=3, batch_size=32, ranks=8, progress=False, out=str(tmp_path / "a")
        )
    )
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    assert [h["steps"] for h in report["history"]] == [2, 4, 6]
    assert report["epochs"] == 3
    report = train(
        TrainConfig(
            subset=64,
            epochs=3,
            batch_size=32,
            max_steps=3,
            ranks=8,
            progress=False,
            out=str(tmp_path / "b"),
        )
    )
    assert [h["steps"] for h in report["history"]] == [2, 3]
    assert report["epochs"] == 2 and report["total_steps"] == 3  # max_steps ends epoch 2


# --------------------------------------------------------------------------- data
def test_bundled_data_is_standardized_with_training_statistics():
    data = load_data(TrainConfig())
    assert data.x_train.shape == (8000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    assert abs(float(data.x_train.mean())) < 1e-4
    assert float(data.x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert data.num_classes == 10


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts_give_the_same_images(tmp_path, layout):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(20, 3 if layout != "nhw" else 1, 16, 16), dtype=np.uint8)
    stored = {"nhw": base[:, 0], "nhwc": np.moveaxis(base, 1, -1), "nchw": base}[layout]
    path = tmp_path / "d.npz"
    labels = np.arange(20) % 3
    np.savez(path, images=stored, labels=labels)
    data = load_data(TrainConfig(data=str(path)))
    raw = base.astype(np.float32) / 255
    mean = raw[:16].mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = raw[:16].std(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    np.testing.assert_allclose(data.x_train, (raw[:16] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_test, (raw[16:] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.y_test, labels[16:])


def test_npz_with_explicit_split(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "split.npz"
    np.savez(
        path,
        x_train=rng.random((30, 1, 20, 20), dtype=np.float32),
        y_train=np.arange(30) % 2,
        x_test=rng.random((7, 1, 20, 20), dtype=np.float32),
        y_test=np.arange(7) % 2,
    )
    data = load_data(TrainConfig(data=str(path)))
    assert data.x_train.shape == (30, 1, 20, 20) and data.x_test.shape == (7, 1, 20, 20)
    assert data.num_classes == 2


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(images=np.zeros((10, 3, 8, 3), np.uint8), labels=np.zeros(10, int)), "channel axis"),
        (dict(images=np.zeros((10, 8, 9), np.uint8), labels=np.zeros(10, int)), "square"),
        (dict(images=np.zeros((10, 8, 8), np.uint8), labels=np.zeros(9, int)), r"\(10,\)"),
        (dict(images=np.zeros((10, 8, 8), np.uint8), labels=np.full(10, 0.5)), "integers"),
        (dict(images=np.zeros((10, 8, 8), np.uint8), labels=np.ones(10, bool)), "integers"),
        (dict(pixels=np.zeros((10, 8, 8), np.uint8)), r"found \['pixels'\]"),
    ],
)
def test_bad_npz_files_are_refused_with_clear_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=message):
        load_data(TrainConfig(data=str(path)))


# --------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "argument --lr: expected a number > 0, got '-1'"),
        (["--tau", "nan"], "argument --tau: expected 'none' or a number >= 0, got 'nan'"),
        (["--momentum", "1"], "argument --momentum: expected 'none' or a number >= 0 and < 1"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--batch-size", "2.5"], "argument --batch-size: expected a positive integer, got '2.5'"),
        (["--ranks", "0"], "argument --ranks: expected 'full', an integer >= 1"),
        (["--ranks", "1.5"], "got '1.5'"),
        (["--model", "vgg16"], "argument --model: expected one of lenet5, vgg-small, resnet18"),
        (["--method", "svd"], "argument --method: expected one of tdlrt, dense, tucker-fixed"),
        (["--data", "digits.csv"], "got 'digits.csv'"),
        (["--data", "missing.npz"], "data file 'missing.npz' does not exist"),
        (["--method", "dense", "--one-pass"], "one_pass needs method 'tdlrt'"),
        (["--threads", "0"], "argument --threads: expected 'auto' or a positive integer, got '0'"),
        (["--checkpoint-every", "-1"], "argument --checkpoint-every: expected an integer >= 0"),
        (["--unknown"], "unrecognized arguments: --unknown"),
        # options the method does not use are refused, not ignored
        (["--method", "tucker-fixed", "--ranks", "8", "--tau", "0.2"], "tau is used only by"),
        (["--method", "dense", "--ranks", "8"], "ranks is used only by the Tucker methods"),
        (["--method", "dense", "--init", "hosvd"], "init is used only by the Tucker methods"),
        (["--inner", "adam", "--momentum", "0.5"], "momentum is used only by inner 'sgd'"),
        # defaults that compress: tucker-fixed needs ranks, and ranks that compress
        (["--method", "tucker-fixed"], "method 'tucker-fixed' needs ranks"),
        (["--method", "tucker-fixed", "--ranks", "full"], "method 'tucker-fixed' needs ranks"),
        (["--method", "tucker-fixed", "--ranks", "1.0"], "does not compress lenet5"),
        (["--resume", "nowhere"], "nothing to resume: 'nowhere' does not exist"),
        (["--resume", "x", "--overwrite"], "resume and overwrite exclude each other"),
        (["--resume", "x", "--out", "y"], "out 'y' differs from resume 'x'"),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_the_value(
    tmp_path, capsys, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress", "--subset", "10", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuckerman train: error:"), captured.err
    assert message in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written: no runs/ folder


def test_no_command_exits_2_and_version_prints_the_versions(capsys):
    assert main([]) == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tuckerman ") and f"torch {torch.__version__}" in out


def test_help_is_generated_from_the_config_fields(capsys):
    import dataclasses

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        flag = "--no-progress" if field.name == "progress" else "--" + field.name.replace("_", "-")
        assert flag in text, flag
    flat = " ".join(text.split())  # argparse wraps the help text
    assert "(default: 0.14 (sgd), 0.2 (adam))" in flat
    assert "(default: 0.03 (sgd), 0.005 (adam))" in flat
    assert "(default: a new runs/<date>-<time>)" in flat


def test_every_option_is_in_the_options_table_of_the_docs():
    import dataclasses
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "train.md"
    if not docs.is_file():
        pytest.skip("docs/ is not next to the tests (an installed copy)")
    table = [line for line in docs.read_text().splitlines() if line.startswith("| `--")]
    documented = {line.split("`")[1].split()[0] for line in table}
    flags = {
        "--no-progress" if f.name == "progress" else "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(TrainConfig)
    }
    assert documented == flags


def test_cifar10_without_torchvision_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    assert main(["train", "--data", "cifar10", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--data cifar10 needs torchvision: `pip install torchvision`" in err
    assert not (tmp_path / "x").exists()


def test_train_config_validation_names_the_value():
    with pytest.raises(ConfigError, match=r"ranks must be .*an integer >= 1.*, got 0"):
        train(TrainConfig(ranks=0))
    with pytest.raises(ConfigError, match=r"batch_size must be a positive integer, got 0"):
        train(TrainConfig(batch_size=0))
    with pytest.raises(ConfigError, match=r"model must be one of .*got 'lenet'"):
        train(TrainConfig(model="lenet"))


# --------------------------------------------------------------------------- the main job
@pytest.mark.slow
def test_main_job_reaches_95_percent_at_80_percent_compression(tmp_path):
    report = _run(tmp_path, "--epochs", "2", "--seed", "0")
    assert report["config"]["model"] == "lenet5" and report["config"]["method"] == "tdlrt"
    assert report["data"]["train_size"] == 8000 and report["data"]["test_size"] == 2000
    assert report["test_accuracy_percent"] >= 95
    assert report["compression_rate_percent"] >= 80


# --------------------------------------------------------------------------- data parallel
# Two gloo processes on the CPU. Each run is bounded: --dist-timeout makes a replica that waits
# for a dead peer fail, and the launcher stops the others when one fails.
# 321 = 10 * 32 + 1 examples: the last batch of each epoch leaves replica 1 without examples
DDP_COMMON = ("--subset", "321", "--epochs", "2", "--batch-size", "32", "--lr", "0.1")
DDP_COMMON += ("--dtype", "float64", "--dist-timeout", "60")
DDP_ARGS = (*DDP_COMMON, "--ranks", "0.2")


def test_shard_weights_make_the_replicas_mean_the_global_mean():
    from tuckerman.integrations.torch._train import shard

    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 7, 32):
        idx = rng.permutation(100)[:m]
        losses = rng.random(100)
        world = 3
        parts = [shard(idx, r, world) for r in range(world)]
        # every example exactly once among the replicas with a nonzero weight
        kept = np.concatenate([p for p, w in parts if w > 0])
        assert sorted(kept) == sorted(idx)
        # DDP averages the replicas' weight * local mean: the mean over the global batch
        ddp_mean = sum(w * losses[p].mean() for p, w in parts) / world
        assert ddp_mean == pytest.approx(losses[idx].mean(), rel=1e-14)


def test_nproc_2_equals_one_process_on_the_global_batch(tmp_path):
    one = _run(tmp_path, *DDP_ARGS, name="one")
    two = _run(tmp_path, *DDP_ARGS, "--nproc", "2", name="two")
    assert one["world_size"] == 1 and one["config"]["nproc"] == 1
    assert two["world_size"] == 2 and two["config"]["nproc"] == 2
    assert two["steps"] == one["steps"] == 22
    assert two["data"] == one["data"]
    # the ranks, which TDLRT changes during the run, exactly at every step
    assert len(two["rank_history"]) == 22 and two["rank_history"] == one["rank_history"]
    assert len({json.dumps(h) for h in one["rank_history"]}) > 3
    assert two["ranks"] == one["ranks"] and two["compression"] == one["compression"]
    for a, b in zip(one["history"], two["history"]):
        assert b["test_accuracy_percent"] == a["test_accuracy_percent"]
        assert b["train_accuracy_percent"] == a["train_accuracy_percent"]  # both replicas
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-12)
    assert two["test_accuracy_percent"] > 30  # it learned something (chance: 10%)
    assert two["history"][1]["train_loss"] < two["history"][0]["train_loss"] - 0.3
    w1, w2 = dense_weights(tmp_path / "one"), dense_weights(tmp_path / "two")
    assert w1.keys() == w2.keys() and len(w1) == 8
    for name in w1:
        assert w1[name].dtype == torch.float64
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-12, msg=name)
    _check_report(two, tmp_path / "two")


def test_nproc_2_dense_method_equals_one_process(tmp_path):
    """The dense model trains with SGD through the same TuckerDDP wrapper."""
    args = (*DDP_COMMON, "--method", "dense", "--epochs", "1")
    one = _run(tmp_path, *args, name="one")
    two = _run(tmp_path, *args, "--nproc", "2", name="two")
    assert two["steps"] == one["steps"] == 11 and two["world_size"] == 2
    assert two["test_accuracy_percent"] == one["test_accuracy_percent"] > 20
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-12)
    assert (
        two["history"][0]["train_accuracy_percent"] == one["history"][0]["train_accuracy_percent"]
    )
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-12, msg=name)


def test_torchrun_runs_one_replica_per_process(tmp_path):
    """``python -m torch.distributed.run ... -m tuckerman.integrations.torch._cli train``
    gives the same report and model as ``--nproc 2`` (same code path after the launch)."""
    import subprocess

    out = {name: tmp_path / name for name in ("spawned", "torchrun")}
    _run(tmp_path, *DDP_ARGS, "--epochs", "1", "--nproc", "2", name="spawned")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["-m", "tuckerman.integrations.torch._cli", "train", *DDP_ARGS, "--epochs", "1"]
    command += ["--no-progress", "--out", str(out["torchrun"])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy:") == 1  # the summary on rank 0 only
    reports = {name: _without_times(read_report(path)) for name, path in out.items()}
    assert reports["torchrun"] == reports["spawned"]
    a = torch.load(out["spawned"] / "model.pt", weights_only=True)
    b = torch.load(out["torchrun"] / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "0"], "argument --nproc: expected a positive integer, got '0'"),
        (["--nproc", "two"], "argument --nproc: expected a positive integer, got 'two'"),
        (["--nproc", "3"], "batch_size 32 is not divisible by nproc 3"),
        (["--nproc", "2", "--device", "cuda"], "device 'cuda' was asked for but torch sees no"),
        (["--dist-timeout", "0"], "argument --dist-timeout: expected a number > 0, got '0'"),
    ],
)
def test_bad_nproc_values_exit_2_before_starting(tmp_path, capsys, monkeypatch, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress", "--subset", "10", "--batch-size", "32", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuckerman train: error:") and message in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_nproc_under_torchrun_must_match_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="nproc 2 differs from WORLD_SIZE 4"):
        train(TrainConfig(nproc=2, progress=False))
    with pytest.raises(ConfigError, match="batch_size 30 is not divisible by nproc 4"):
        train(TrainConfig(batch_size=30, progress=False))


def test_bad_data_in_a_data_parallel_run_exits_2_before_writing(tmp_path, capsys):
    # a configuration error found in the replicas (here: a data check) exits with status 2;
    # other failures of a replica: tests/test_train_faults.py
    bad = tmp_path / "bad.npz"
    labels = np.r_[np.zeros(39, np.int64), 99999]
    np.savez(bad, images=np.zeros((40, 16, 16), np.uint8), labels=labels)
    assert main(["train", "--nproc", "2", "--data", str(bad), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "label 99999 at index 39" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- progress
def test_progress_is_bars_on_a_terminal_and_lines_elsewhere():
    import io

    from tuckerman.integrations.torch._train._progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress(True, Terminal()).mode == "bar"
    assert Progress(True, io.StringIO()).mode == "lines"
    assert Progress(False, Terminal()).mode == "off"
    stream = io.StringIO()
    progress = Progress(True, stream, interval=0.0)
    bar = progress.bar("epoch 1/1", 3)
    for _ in range(3):
        bar.update(1, "loss=1.0")
    bar.close("epoch 1/1: done")
    lines = stream.getvalue().splitlines()
    assert lines == ["epoch 1/1: 1/3 steps (33%), " + lines[0].split(", ", 1)[1],
                     lines[1], "epoch 1/1: done"]  # fmt: skip
    assert "2/3 steps (67%)" in lines[1] and lines[1].endswith("loss=1.0")


def test_progress_written_to_a_file_is_plain_lines_with_the_real_epoch_count(tmp_path, capsys):
    # --max-steps 3 with 2 steps per epoch: the run has 2 epochs of the 3 asked for
    out = tmp_path / "run"
    args = ["train", "--subset", "64", "--epochs", "3", "--max-steps", "3", "--ranks", "8"]
    assert main([*args, "--checkpoint-every", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "epoch 1/2: 2 steps in" in err and "epoch 2/2: 1 steps in" in err
    assert "epoch 1/3" not in err
    assert "epoch 1/2: train loss " in err and "% (evaluation " in err
    assert f"checkpoint at step 1: {out}/checkpoint.pt (" in err
