"""Issue 22.2: image folders as users have them: every file checked up front (all problems at once, or
skipped and listed), cached; 16-bit images scaled, EXIF orientation applied; pack of a flat class tree."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import tiny_job
from PIL import Image

from orchestrator.after.trained import Preprocess
from orchestrator.cli import main
from orchestrator.config.spec import DataSpec
from orchestrator.data import image_check
from orchestrator.data.decode import decode_image, library_message
from orchestrator.data.sources import load_splits
from orchestrator.data.splits import DataError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def messy_folder(root, per_class: int = 10):
    """Two classes of good JPEGs, plus a truncated JPEG, a zero-byte file and a text file named .jpg."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("shopping list")
    return root


BAD = {"cat/truncated.jpg": "damaged or truncated", "dog/empty.jpg": "empty file (0 bytes)",
       "dog/notes.jpg": "not an image"}


def test_every_bad_file_is_named_at_once_with_exit_2(tmp_path, write_job, capsys):
    root = messy_folder(tmp_path / "pics")
    job = write_job(tiny_job(tmp_path / "runs", "messy", data={"source": f"imagefolder:{root}", "classes": None,
                                                                "max_per_class": None}, scaling={"num_workers": 1}))
    for command in (["plan", str(job)], ["train", str(job), "--local"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "3 of 23 image files cannot be read (data.on_bad_image: skip leaves them out)" in err
        for name, reason in BAD.items():
            assert f"{root / name}: {reason}" in err
        assert "/__w/" not in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "messy" / "checkpoint_best").exists()


def test_skip_leaves_them_out_and_lists_them_in_the_run_folder(tmp_path, write_job, capsys):
    root = messy_folder(tmp_path / "pics")
    job = write_job(tiny_job(tmp_path / "runs", "skipping", scaling={"num_workers": 1}, optim={"base_lr": 0.01},
                             schedule={"epochs": 1, "warmup_epochs": 0},
                             data={"source": f"imagefolder:{root}", "classes": None, "max_per_class": None,
                                   "on_bad_image": "skip"}))
    assert main(["train", str(job), "--local"]) == 0
    assert "left out 3 unreadable image file(s) of 23" in capsys.readouterr().out
    listed = (tmp_path / "runs" / "skipping" / "bad_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(str(root / name) for name in BAD)


def test_answers_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    root = messy_folder(tmp_path / "pics")
    spec = DataSpec(source=f"imagefolder:{root}", on_bad_image="skip")
    first = load_splits(spec, 0)
    calls = []
    real = image_check.image_problem
    monkeypatch.setattr(image_check, "image_problem", lambda path: calls.append(path) or real(path))
    again = load_splits(spec, 0)
    assert calls == [] and again.bad_images == first.bad_images and len(again.train) == len(first.train)
    Image.new("RGB", (24, 24)).save(root / "dog" / "notes.jpg")     # fixed: a new size and mtime
    fixed = load_splits(spec, 0)
    assert calls == [str(root / "dog" / "notes.jpg")] and len(fixed.bad_images) == 2


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    image = decode_image(tmp_path / "ramp.png", "ramp.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    assert image.min() == 0 and image.max() == 255 and 120 <= float(image.float().mean()) <= 135   # a ramp, not white
    assert torch.equal(image[0], image[2])


def rotated_jpeg(path, suffix: str = "jpg"):
    """A 32-wide, 16-high image whose EXIF says 'rotate 90 degrees clockwise to view' (orientation 6):
    upright it is 16 wide and 32 high. Left half dark, right half light."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 250
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == "jpg" else {}))
    return path


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_exif_orientation_is_applied_unless_turned_off(tmp_path, suffix):
    path = rotated_jpeg(tmp_path / f"phone.{suffix}", suffix)
    upright = decode_image(path, str(path))
    assert upright.shape == (3, 32, 16)
    assert upright[:, :8].float().mean() < 60 and upright[:, 24:].float().mean() > 190   # light half now at the bottom
    assert decode_image(path, str(path), exif_transpose=False).shape == (3, 16, 32)


def test_predict_and_export_metadata_carry_the_orientation_choice():
    meta = Preprocess(16, (0.5,) * 3, (0.5,) * 3, None, exif_transpose=False).to_metadata()
    assert json.loads(meta["exif_transpose"]) is False
    assert Preprocess.from_metadata(meta).exif_transpose is False
    assert Preprocess.from_metadata({k: v for k, v in meta.items() if k != "exif_transpose"}).exif_transpose is True


def test_pack_takes_a_flat_class_tree_and_re_encodes_upright(tmp_path, capsys):
    root = messy_folder(tmp_path / "pics")
    rotated_jpeg(root / "cat" / "phone.jpg")
    assert main(["pack", str(root), str(tmp_path / "packed"), "--max-side", "8", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert sum(counts["splits"].values()) == 21 and counts["splits"]["val"] >= 3 and counts["skipped"] == 3
    import pyarrow.parquet as pq
    rows = [row for shard in sorted((tmp_path / "packed").glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]
    phone = next(row for row in rows if row["path"].endswith("phone.jpg"))
    assert Image.open(io.BytesIO(phone["image"])).size == (4, 8)        # upright (16x32 scaled to fit 8) before re-encoding
    assert main(["pack", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_library_messages_lose_their_build_paths():
    exc = RuntimeError("decode_jpeg, /__w/vision/vision/pytorch/vision/torchvision/csrc/io/image/cpu/decode_jpeg.cpp:171, "
                       "Image is incomplete or truncated")
    assert library_message(exc) == "Image is incomplete or truncated"


def test_an_error_lists_at_most_a_hundred_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(120):
        (tmp_path / ("a" if i % 2 else "b") / f"{i}.png").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        load_splits(DataSpec(source=f"imagefolder:{tmp_path}"), 0)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("data.source: 120 of 120 image files") and lines[-1] == "  ... and 20 more"
