"""`alexnet predict` and `Classifier` against a direct computation of the paper's test
pipeline: resize + centre square, mean image subtracted at the crop's position, divided
by the pixel scale, through the network (contiguous memory, not the channels-last path
the classifier uses), softmax; the ten-crop average written out patch by patch."""

from __future__ import annotations

import functools
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import cli
from alexnet.checkpoint import load_model_file, save_model
from alexnet.dataset import DataStats
from alexnet.images import ImageError, load_rgb, resize_center_crop
from alexnet.model import build_model
from alexnet.predict import Classifier

NAMES = ["tabby cat", "golden retriever", "goldfinch"]


def make_checkpoint(path, variant, image_size, crop, pixel_scale, seed, extra=None):
    torch.manual_seed(seed)
    model = build_model(variant, num_classes=3, init="kaiming", input_size=crop)
    mean = 100 + 50 * torch.rand(3, image_size, image_size)  # not flat: a wrong crop position shows
    stats = DataStats(mean_image=mean, eigval=torch.tensor([3.0, 2.0, 1.0]), eigvec=torch.eye(3))
    save_model(path, model, ["c0", "c1", "c2"], stats,
               {"image_size": image_size, "crop": crop, "pixel_scale": pixel_scale}, extra)
    return path


def make_image(path, w, h, seed):
    """Smooth colour blobs plus noise, so the resize's filtering matters."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    a = np.clip(np.asarray(small, np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return str(path)


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    return make_checkpoint(d / "paper.safetensors", "paper", 256, 227, 16.0, 0, {"class_names": NAMES})


@pytest.fixture(scope="module")
def clf(paper):
    return Classifier.load(paper, device="cpu")


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    """Five images of different sizes and formats in a tree, and a non-image beside them."""
    d = tmp_path_factory.mktemp("imgs")
    (d / "sub").mkdir()
    (d / "notes.txt").write_text("not an image")
    return [make_image(d / "a.jpg", 300, 200, 1), make_image(d / "b.png", 200, 350, 2),
            make_image(d / "e.bmp", 180, 180, 5), make_image(d / "sub" / "c.png", 256, 256, 3),
            make_image(d / "sub" / "d.jpeg", 500, 260, 4)]  # sorted order of a recursive walk


@functools.lru_cache(maxsize=1)
def oracle_model(ck_path):
    ck = load_model_file(ck_path)
    return ck, ck.build_model().eval()


def direct(ck_path, paths, ten_crop=False):
    """The oracle: softmax of the network on each image, preprocessed by hand."""
    ck, model = oracle_model(ck_path)
    s, c, scale = ck.preprocess["image_size"], ck.preprocess["crop"], ck.preprocess["pixel_scale"]
    e, mid = s - c, (s - c) // 2
    offsets = [(0, 0), (0, e), (e, 0), (e, e), (mid, mid)] if ten_crop else [(mid, mid)]
    rows = []
    with torch.no_grad():
        for p in paths:
            x = (torch.from_numpy(resize_center_crop(load_rgb(p), s)).float() - ck.stats.mean_image) / scale
            patches = [x[:, t:t + c, l:l + c] for t, l in offsets]
            if ten_crop:
                patches += [q.flip(-1) for q in patches]
            rows.append(torch.softmax(model(torch.stack(patches)), -1).mean(0))
    return torch.stack(rows)


def run(capsys, *argv):
    """`alexnet predict ARGV` through cli.main (its error handling). Returns (exit code,
    stdout, stderr)."""
    try:
        rc = cli.main(["predict", *map(str, argv)])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- the Python API -------------------------------------------------------------------


def test_probabilities_equal_direct_computation(clf, paper, imgs):
    got = clf.probabilities(imgs)
    want = direct(paper, imgs)
    assert got.shape == (5, 3)
    assert want.max(1).values.min() < 0.95  # not saturated: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ten_crop_equals_mean_softmax_of_ten_patches(clf, paper, imgs):
    got = clf.probabilities(imgs[:2], ten_crop=True)
    torch.testing.assert_close(got, direct(paper, imgs[:2], ten_crop=True), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, clf.probabilities(imgs[:2]), atol=1e-4)  # differs from one crop


def test_preprocessing_comes_from_the_checkpoint(tmp_path, imgs):
    """owt network: 240 px images, 224 crops, pixel scale 64, class names = the classes."""
    path = make_checkpoint(tmp_path / "owt.safetensors", "owt", 240, 224, 64.0, 1)
    owt = Classifier.load(path, device="cpu")
    assert owt.image_size == 240 and owt.class_names == ["c0", "c1", "c2"]
    torch.testing.assert_close(owt.probabilities(imgs[:2]), direct(path, imgs[:2]), rtol=1e-4, atol=1e-5)


def test_a_file_whose_preprocessing_does_not_fit_its_mean_image_is_refused(paper, tmp_path):
    """Written by hand (save_model refuses it, with the same check): a crop that is not
    the network's input cannot be preprocessed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from alexnet.checkpoint import CheckpointError

    with safe_open(str(paper), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "preprocess": json.dumps({"image_size": 256, "crop": 224})})
    with pytest.raises(CheckpointError, match=r"preprocess must give image_size 256 \(the mean image's side\) and "
                                              r"crop 227 \(the network's input\), not 256 and 224"):
        Classifier.load(bad, device="cpu")
    # evaluate shares the check (it took its crop from the network and its image size from
    # the file, so the two commands could preprocess one file differently)
    from alexnet.evaluate import evaluate_checkpoint

    with pytest.raises(CheckpointError, match=r"preprocess must give image_size 256 .* not 256 and 224"):
        evaluate_checkpoint(bad, tmp_path / "no-data-needed", out_dir=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()
    # a mean image that is not square, or smaller than the crop: export's traceback, and
    # predict's "expected square images" as if the user's image were wrong
    from alexnet.export import export_checkpoint

    for shape, size in (((3, 256, 300), 300), ((3, 200, 200), 200)):
        odd = tmp_path / f"mean-{shape[1]}x{shape[2]}.safetensors"
        mean = torch.full(shape, 100.0)
        save_file({**tensors, "stats.mean_image": mean}, str(odd),
                  metadata={**meta, "preprocess": json.dumps({"image_size": size, "crop": 227})})
        said = rf"{odd}: the mean image is {shape[1]}x{shape[2]}; it must be square and at least the network's 227x227"
        with pytest.raises(CheckpointError, match=said):
            Classifier.load(odd, device="cpu")
        with pytest.raises(CheckpointError, match=said):
            export_checkpoint(odd, tmp_path / "out.onnx")
        assert not (tmp_path / "out.onnx").exists()


def test_path_pil_and_tensor_inputs_agree(clf, imgs):
    pil = Image.open(imgs[0]).convert("RGB")
    hwc = torch.from_numpy(np.asarray(pil).copy())  # (H, W, 3) uint8
    chw = hwc.permute(2, 0, 1)
    inputs = [imgs[0], pil, hwc, chw, chw.float(), hwc.numpy()]
    probs = clf.probabilities(inputs)
    for row in probs[1:]:
        torch.testing.assert_close(row, probs[0])


def test_a_read_only_array_is_read_without_a_warning(clf, imgs):
    import warnings

    a = np.asarray(Image.open(imgs[0]).convert("RGB"))  # Pillow's arrays are read-only
    assert not a.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = clf.probabilities([a])
    torch.testing.assert_close(p[0], clf.probabilities([imgs[0]])[0])


@pytest.mark.parametrize("image, words", [
    (np.full((20, 20, 3), np.nan), "NaN or infinite"),
    (np.full((20, 20, 3), 300.0), "values from 300 to 300"),
    (np.full((20, 20, 3), -2, dtype=np.int32), "values from -2 to -2"),
    (np.full((20, 20, 3), 256, dtype=np.int64), "values from 256 to 256"),
    (np.ones((20, 20, 3), dtype=bool), "a torch.bool image"),
])
def test_arrays_outside_rgb_levels_are_refused(clf, image, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        clf.probabilities([image])


@pytest.mark.parametrize("image", [np.zeros((0, 5, 3), np.uint8), np.zeros((3, 5, 0), np.uint8),
                                   Image.new("RGB", (0, 0))], ids=["no rows", "no columns", "0x0 Pillow"])
def test_empty_images_are_refused(clf, image):
    with pytest.raises(ImageError, match="empty image"):
        clf.probabilities([image])


def test_wider_integer_arrays_are_read_as_levels(clf):
    a = np.random.default_rng(0).integers(0, 256, (30, 40, 3))
    want = clf.probabilities([a.astype(np.uint8)])
    for dtype in (np.uint16, np.uint32, np.int16):
        torch.testing.assert_close(clf.probabilities([a.astype(dtype)]), want)
    with pytest.raises(ValueError, match="values from 0 to 300"):
        clf.probabilities([np.where(a > 128, 300, 0).astype(np.uint16)])


def test_an_opened_pillow_image_gets_the_checks_a_file_gets(clf, imgs, tmp_path):
    data = open(imgs[0], "rb").read()
    Image.open(imgs[0]).save(tmp_path / "x.jpg", quality=90)
    jpeg = (tmp_path / "x.jpg").read_bytes()
    with pytest.raises(ImageError, match="truncated"):
        clf.probabilities([Image.open(io.BytesIO(jpeg[:len(jpeg) // 2]))])  # not decoded until used
    torch.testing.assert_close(clf.probabilities([Image.open(io.BytesIO(data))]), clf.probabilities([imgs[0]]))


@pytest.mark.parametrize("top", [0, 2.5, "3"])
def test_top_must_be_a_whole_number(clf, imgs, top):
    with pytest.raises(ValueError, match="top must be a whole number"):
        clf(imgs[0], top=top)


def test_call_gives_top_pairs_capped_at_class_count(clf, imgs):
    p = clf.probabilities([imgs[1]])[0]
    top2 = clf(imgs[1], top=2)
    order = p.argsort(descending=True).tolist()
    assert [n for n, _ in top2] == [NAMES[i] for i in order[:2]]
    assert [v for _, v in top2] == pytest.approx(p[order[:2]].tolist())
    assert len(clf(imgs[1], top=50)) == 3
    (a,), (b,) = clf.predict_batch(imgs[:2], top=1)
    assert [a, b] == [(n, pytest.approx(v)) for (n, v), in (clf(imgs[0], top=1), clf(imgs[1], top=1))]


def test_batches_equal_one_by_one(clf, imgs):
    one_by_one = torch.cat([clf.probabilities([p]) for p in imgs])
    torch.testing.assert_close(clf.probabilities(imgs, batch_size=2), one_by_one, rtol=1e-4, atol=1e-6)


# --- the command -------------------------------------------------------------------------


def test_cli_folder_text_output(capsys, clf, paper, imgs):
    folder = imgs[0].rsplit("/", 1)[0]
    rc, out, err = run(capsys, paper, folder)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 5 * 4  # a path, then min(5, 3 classes) lines, per image; notes.txt skipped
    probs = clf.probabilities(imgs)
    for k, path in enumerate(imgs):
        block = lines[4 * k:4 * k + 4]
        assert block[0] == path
        assert all(line.startswith("  ") for line in block[1:])
        values, idx = probs[k].topk(3)
        assert [line[9:] for line in block[1:]] == [NAMES[i] for i in idx.tolist()]
        assert [line[2:7] for line in block[1:]] == [f"{v:.3f}" for v in values.tolist()]


def test_cli_names_with_control_characters_stay_on_one_line(capsys, clf, paper, imgs, tmp_path):
    odd = tmp_path / "a\nb\tc.png"
    Image.open(imgs[0]).save(odd)
    rc, out, err = run(capsys, paper, odd, "--top", 1)
    assert rc == 0 and out.splitlines()[0] == str(tmp_path / "a\\nb\\tc.png") and len(out.splitlines()) == 2


def test_cli_glob_json_batches_and_top_cap(capsys, clf, paper, imgs):
    folder = imgs[0].rsplit("/", 1)[0]
    rc, out, err = run(capsys, paper, f"{folder}/*.jpg", f"{folder}/sub", imgs[1], imgs[2],
                       "--json", "--batch-size", "2", "--top", "50")
    assert rc == 0 and err == ""
    doc = json.loads(out)
    order = [imgs[0], imgs[3], imgs[4], imgs[1], imgs[2]]
    assert [r["image"] for r in doc] == order
    assert all(len(r["top"]) == 3 for r in doc)
    got = torch.tensor([[t["prob"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in doc])
    torch.testing.assert_close(got, torch.cat([clf.probabilities([p]) for p in order]), rtol=1e-4, atol=1e-6)
    assert all(t["class"] == NAMES[t["index"]] for r in doc for t in r["top"])


def test_a_glob_that_matches_folders_takes_their_images(tmp_path):
    """A quoted pattern is what the shell would have made of it: a folder it matches is
    searched, as the same folder named on the command line is (it was dropped: "no image
    files in g/*")."""
    from alexnet.predict import expand_inputs

    for rel in ("g/cats/a.png", "g/dogs/b.jpg", "g/dogs/deeper/c.png", "g/top.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
    (tmp_path / "g" / "notes.txt").write_text("x")
    g = str(tmp_path / "g")
    found, missing = expand_inputs([f"{g}/*", f"{g}/dogs"])
    assert missing == [] and found == [f"{g}/cats/a.png", f"{g}/dogs/b.jpg", f"{g}/dogs/deeper/c.png",
                                       f"{g}/notes.txt", f"{g}/top.png"]  # (a file matched is kept, as the shell's)
    assert expand_inputs([f"{g}/no*"]) == ([f"{g}/notes.txt"], [])
    assert expand_inputs([f"{g}/x*"]) == ([], [f"{g}/x*"])


@pytest.fixture
def bad(tmp_path):
    """Files that are not usable images, each for its own reason."""
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    for name in ("trunc.jpg", "trunc.png"):
        data = open(make_image(tmp_path / name, 200, 160, 7), "rb").read()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    make_image(tmp_path / "big.png", 400, 300, 8)  # 120,000 pixels
    return sorted(str(p) for p in tmp_path.iterdir())


def test_cli_bad_images_are_reported_and_others_predicted(capsys, paper, imgs, bad):
    gone = bad[0].rsplit("/", 1)[0] + "/gone.jpg"
    rc, out, err = run(capsys, paper, imgs[0], gone, *bad, imgs[1], "--max-pixels", "100000", "--batch-size", "3")
    assert rc == 1
    assert err.startswith(f"alexnet: error: {gone}: no such file, or no image files in it\n")
    errs = err.splitlines()[1:]
    assert len(errs) == len(bad) == 5
    for path, line in zip(bad, errs):
        assert line.startswith(f"alexnet: error: {path}: ") and len(line) > len(path) + 20
    assert "too large" in errs[0] and "empty" in errs[1]
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [imgs[0], imgs[1]]

    rc, out, err = run(capsys, paper, imgs[0], *bad, "--max-pixels", "100000", "--json")
    doc = json.loads(out)
    assert rc == 1 and len(err.splitlines()) == 5
    assert [r["image"] for r in doc] == [imgs[0], *bad] and "top" in doc[0]
    assert all(r["error"] for r in doc[1:])


def test_cli_usage_errors_exit_2(capsys, paper, imgs, tmp_path):
    for argv in ([paper, imgs[0], "--top", "0"], [paper, imgs[0], "--top", "x"],
                 [tmp_path / "missing.safetensors", imgs[0]],  # no checkpoint
                 [paper, tmp_path],  # a folder with no images
                 [paper, tmp_path / "nothing-*.jpg"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and out == "", argv
        assert len(err.splitlines()) == 1 and err.startswith("alexnet: error: "), argv


def test_weights_that_do_not_fit_are_a_checkpoint_error(paper):
    from alexnet.checkpoint import CheckpointError

    ck = load_model_file(paper)
    ck.state_dict.pop(next(iter(ck.state_dict)))
    with pytest.raises(CheckpointError, match="weights do not fit the paper network"):
        ck.build_model()
    ck = load_model_file(paper)
    ck.state_dict["features.0.weight"] = ck.state_dict["features.0.weight"][:5]
    with pytest.raises(CheckpointError, match="weights do not fit"):
        ck.build_model()


def test_float_levels_are_rounded_to_the_nearest_level():
    """A float image (e.g. the result of a resize in float) becomes uint8 levels by
    rounding: 12.6 is level 13, not 12."""
    from alexnet.predict import _to_pil

    levels = np.random.default_rng(0).uniform(0, 255, (4, 5, 3))
    got = np.asarray(_to_pil(torch.from_numpy(levels), max_pixels=10 ** 6))
    assert np.array_equal(got, np.rint(levels).astype(np.uint8))


def test_float_images_in_0_to_1_are_read_as_such(clf, imgs):
    """matplotlib's imread and ToTensor give floats in 0..1: read as levels 0..255 (as a
    Pillow "F" image is), not rounded to black and level 1."""
    hwc = np.asarray(Image.open(imgs[0]).convert("RGB"))
    want = clf.probabilities([hwc])
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    unit = [hwc / 255.0, chw.float() / 255, (hwc / 255.0).astype(np.float32)]
    torch.testing.assert_close(clf.probabilities(unit), want.expand(3, -1))


def test_a_classifier_left_in_training_mode_still_predicts_in_eval_mode(clf, imgs):
    """clf.model.train() (by a notebook cell before) would switch dropout on and let a
    BatchNorm network overwrite its statistics: probabilities runs in eval mode and gives
    the mode back."""
    want = clf.probabilities(imgs[:2])
    clf.model.train()
    try:
        torch.testing.assert_close(clf.probabilities(imgs[:2]), want)
        assert clf.model.training
    finally:
        clf.model.eval()


@pytest.mark.parametrize("one", ["path", "Path", "pil", "array"])
def test_one_image_where_a_list_is_expected_is_a_type_error(clf, imgs, one):
    from pathlib import Path

    image = {"path": imgs[0], "Path": Path(imgs[0]), "pil": Image.open(imgs[0]),
             "array": np.asarray(Image.open(imgs[0]).convert("RGB"))}[one]
    with pytest.raises(TypeError, match=r"expects a list of images, got one .*clf\(image\)"):
        clf.predict_batch(image)
    assert clf(image, top=np.int64(2)) == clf(imgs[0], top=2)  # (a NumPy integer is a whole number)


def test_an_error_of_the_python_api_names_the_image(clf, imgs, tmp_path):
    """A batch of many paths failing on one must say which: the path, or for an array
    its place in the list."""
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=re.escape(f"{tmp_path / 'zero.jpg'}: ")):
        clf(str(tmp_path / "zero.jpg"))
    with pytest.raises(ImageError, match=re.escape(f"{tmp_path / 'zero.jpg'}: ")):
        clf.predict_batch([imgs[0], tmp_path / "zero.jpg"])
    with pytest.raises(ValueError, match=r"^image 1: the image has NaN"):
        clf.probabilities([imgs[0], np.full((20, 20, 3), np.nan)])
    with pytest.raises(ValueError, match=r"^image 2: "):  # its place in the whole list, not in its batch
        clf.probabilities([imgs[0], imgs[0], np.full((20, 20, 3), np.nan)], batch_size=2)


def test_a_pixel_limit_below_the_image_size_refuses_only_large_files(capsys, paper, tmp_path):
    """--max-pixels refuses files by their header; the 256x256 images that predict (and
    serve) prepare from the small ones are decoded already and not held to it."""
    small = [make_image(tmp_path / "s1.png", 50, 50, 11), make_image(tmp_path / "s2.png", 80, 60, 12)]
    big = make_image(tmp_path / "big.png", 100, 100, 13)  # 10,000 pixels
    rc, out, err = run(capsys, paper, small[0], big, small[1], "--max-pixels", "5000")
    assert rc == 1 and [line for line in out.splitlines() if not line.startswith(" ")] == small
    assert err.startswith(f"alexnet: error: {big}: too large") and err.count("\n") == 1, err
    clf = Classifier.load(paper, device="cpu", max_pixels=5000)
    prepared = [clf.prepare(p) for p in small]  # the README's way past bad files
    assert torch.equal(clf.probabilities(prepared), clf.probabilities(small))
    with pytest.raises(ImageError, match="too large"):
        clf.prepare(big)


def test_a_reversed_numpy_view_is_an_image_like_its_copy(clf):
    """OpenCV's BGR-to-RGB idiom, bgr[..., ::-1], gives negative strides, which torch
    cannot wrap; any numpy layout is an image."""
    rng = np.random.default_rng(5)
    bgr = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for view in (bgr[..., ::-1], bgr[::-1, ::-2], np.moveaxis(bgr, -1, 0)[::-1]):
        assert min(view.strides) < 0
        assert torch.equal(clf.probabilities([view]), clf.probabilities([view.copy()]))
